//! The caller's audio as Twilio carries it (8 kHz µ-law, mono) from a WAV file, and what the
//! caller heard back into a WAV file.
//!
//! PCM at any rate from 8 to 48 kHz is mixed down to mono and resampled with rubato's FFT
//! resampler, which band-limits before it decimates (dropping samples would fold everything
//! above 4 kHz back into the speech band). µ-law is G.711's, from `audio-codec-algorithms`.

use std::io::Cursor;
use std::path::Path;

use rubato::audioadapter_buffers::direct::SequentialSliceOfVecs;
use rubato::{Fft, FixedSync, Resampler};

/// Twilio Media Streams audio: 8000 samples a second.
pub const RATE: u32 = 8000;
/// µ-law's code for 0: what a silent line carries.
pub const SILENCE: u8 = 0xFF;

const LOWEST_RATE: u32 = 8000;
const HIGHEST_RATE: u32 = 48_000;
/// `WAVE_FORMAT_MULAW` in a WAV file's `fmt ` chunk.
const FORMAT_MULAW: u16 = 7;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("{0}")]
    Read(#[from] std::io::Error),
    #[error("not a WAV file this can read ({0})")]
    Wav(#[from] hound::Error),
    #[error("its sample rate is {0} Hz; 8000 to 48000 Hz are supported")]
    Rate(u32),
    #[error("it has {0} channels; mono and stereo are supported")]
    Channels(u16),
    #[error("it is µ-law at {rate} Hz with {channels} channels; µ-law must be 8000 Hz mono")]
    MulawFormat { rate: u32, channels: u16 },
    #[error("its µ-law data chunk is missing")]
    MulawData,
    #[error("it holds no audio")]
    Empty,
    #[error("the resampler cannot be set up ({0})")]
    Resampler(#[from] rubato::ResamplerConstructionError),
    #[error("resampling failed ({0})")]
    Resample(#[from] rubato::ResampleError),
}

/// The WAV at `path` as 8 kHz µ-law, one byte a sample.
pub fn load(path: &Path) -> Result<Vec<u8>, AudioError> {
    let bytes = std::fs::read(path)?;
    let mulaw = match mulaw_wav(&bytes) {
        Some(mulaw) => mulaw?,
        None => {
            let (samples, rate) = read_pcm(bytes)?;
            encode(&resample_to_8k(&samples, rate)?)
        }
    };
    if mulaw.is_empty() {
        return Err(AudioError::Empty);
    }
    Ok(mulaw)
}

/// A PCM (integer or float) WAV as mono samples in [-1, 1] and its rate.
fn read_pcm(bytes: Vec<u8>) -> Result<(Vec<f32>, u32), AudioError> {
    let mut reader = hound::WavReader::new(Cursor::new(bytes))?;
    let spec = reader.spec();
    if !(LOWEST_RATE..=HIGHEST_RATE).contains(&spec.sample_rate) {
        return Err(AudioError::Rate(spec.sample_rate));
    }
    let channels = spec.channels;
    if !(1..=2).contains(&channels) {
        return Err(AudioError::Channels(channels));
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>()?,
        hound::SampleFormat::Int => {
            // Full scale of a signed sample of this width.
            let full_scale = (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|sample| sample.map(|s| s as f32 / full_scale))
                .collect::<Result<_, _>>()?
        }
    };
    let mono = interleaved
        .chunks(usize::from(channels))
        .map(|frame| frame.iter().sum::<f32>() / f32::from(channels))
        .collect();
    Ok((mono, spec.sample_rate))
}

/// `samples` at `rate`, resampled to 8 kHz (returned as they are when already at 8 kHz).
pub fn resample_to_8k(samples: &[f32], rate: u32) -> Result<Vec<f32>, AudioError> {
    if rate == RATE || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let to_usize = |rate: u32| usize::try_from(rate).expect("a sample rate fits a usize");
    let mut resampler = Fft::<f32>::new(to_usize(rate), to_usize(RATE), 1024, 1, FixedSync::Both)?;
    let channels = [samples.to_vec()];
    let input = SequentialSliceOfVecs::new(&channels, 1, samples.len())
        .expect("one channel of exactly this many frames");
    let output = resampler.process_all(&input, samples.len(), None)?;
    Ok(output.take_data())
}

/// Samples in [-1, 1] as µ-law.
pub fn encode(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .map(|&sample| {
            // Clamped and rounded to 16 bits first, so the cast cannot truncate.
            #[allow(clippy::cast_possible_truncation)]
            let linear = (sample.clamp(-1.0, 1.0) * f32::from(i16::MAX)).round() as i16;
            audio_codec_algorithms::encode_ulaw(linear)
        })
        .collect()
}

pub fn decode_sample(mulaw: u8) -> i16 {
    audio_codec_algorithms::decode_ulaw(mulaw)
}

/// The data of a µ-law WAV, or `None` for any other file (hound reads PCM and float WAVs
/// only, so this one format is found by walking the RIFF chunks here).
fn mulaw_wav(bytes: &[u8]) -> Option<Result<Vec<u8>, AudioError>> {
    if bytes.get(..4) != Some(b"RIFF") || bytes.get(8..12) != Some(b"WAVE") {
        return None;
    }
    let mut format = None;
    let mut rest = &bytes[12..];
    while rest.len() >= 8 {
        let (id, size) = (&rest[..4], u32::from_le_bytes(rest[4..8].try_into().ok()?));
        let size = usize::try_from(size).ok()?;
        let body = rest.get(8..8 + size).unwrap_or(&rest[8..]);
        match id {
            b"fmt " if body.len() >= 16 => {
                let tag = u16::from_le_bytes([body[0], body[1]]);
                if tag != FORMAT_MULAW {
                    return None;
                }
                let channels = u16::from_le_bytes([body[2], body[3]]);
                let rate = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                if (rate, channels) != (RATE, 1) {
                    return Some(Err(AudioError::MulawFormat { rate, channels }));
                }
                format = Some(());
            }
            b"data" if format.is_some() => return Some(Ok(body.to_vec())),
            _ => {}
        }
        // Chunks are padded to an even length.
        let next = 8 + size + (size & 1);
        rest = rest.get(next..).unwrap_or_default();
    }
    format.map(|()| Err(AudioError::MulawData))
}

/// Writes what the caller heard: 16-bit PCM, mono, 8 kHz.
pub fn write_heard(path: &Path, samples: &[i16]) -> Result<(), hound::Error> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec)?;
    for &sample in samples {
        writer.write_sample(sample)?;
    }
    writer.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` samples of a half-scale sine at `rate`.
    fn sine(frequency: f32, rate: u32, count: usize) -> Vec<f32> {
        (0..count)
            .map(|n| 0.5 * (std::f32::consts::TAU * frequency * n as f32 / rate as f32).sin())
            .collect()
    }

    /// The frequency of a sine from its upward zero crossings, away from the edges.
    fn frequency(samples: &[f32], rate: u32) -> f32 {
        let middle = &samples[samples.len() / 10..samples.len() * 9 / 10];
        let crossings: Vec<usize> = middle
            .windows(2)
            .enumerate()
            .filter(|(_, pair)| pair[0] < 0.0 && pair[1] >= 0.0)
            .map(|(n, _)| n)
            .collect();
        let periods = (crossings.len() - 1) as f32;
        let span = (crossings[crossings.len() - 1] - crossings[0]) as f32;
        periods * rate as f32 / span
    }

    #[test]
    fn a_1_khz_sine_at_44_1_khz_becomes_a_1_khz_sine_at_8_khz() {
        let input = sine(1000.0, 44_100, 44_100);
        let output = resample_to_8k(&input, 44_100).unwrap();
        assert!(output.len().abs_diff(8000) <= 1, "{} samples", output.len());
        let measured = frequency(&output, 8000);
        assert!((measured - 1000.0).abs() < 5.0, "{measured} Hz");
        let peak = output.iter().fold(0f32, |peak, s| peak.max(s.abs()));
        assert!((peak - 0.5).abs() < 0.05, "the level is kept: {peak}");
    }

    #[test]
    fn a_tone_above_4_khz_is_filtered_out_not_folded_back() {
        // Sample dropping would turn 6 kHz at 48 kHz into a loud 2 kHz at 8 kHz.
        let output = resample_to_8k(&sine(6000.0, 48_000, 48_000), 48_000).unwrap();
        let middle = &output[800..7200];
        let peak = middle.iter().fold(0f32, |peak, s| peak.max(s.abs()));
        assert!(peak < 0.02, "{peak}");
    }

    #[test]
    fn every_supported_rate_keeps_the_duration() {
        for rate in [8000, 11_025, 16_000, 22_050, 32_000, 44_100, 48_000] {
            let half_a_second = usize::try_from(rate / 2).unwrap();
            let output = resample_to_8k(&sine(440.0, rate, half_a_second), rate).unwrap();
            assert!(output.len().abs_diff(4000) <= 1, "{rate}: {}", output.len());
        }
    }

    #[test]
    fn mulaw_silence_is_0xff_and_a_loud_sample_survives_the_round_trip() {
        assert_eq!(encode(&[0.0]), [SILENCE]);
        assert_eq!(decode_sample(SILENCE), 0);
        for sample in [-0.9f32, -0.25, -0.01, 0.01, 0.25, 0.9] {
            let back = f32::from(decode_sample(encode(&[sample])[0])) / f32::from(i16::MAX);
            // µ-law keeps about 3 % of the value (plus a small step near zero).
            assert!(
                (back - sample).abs() <= sample.abs() * 0.04 + 0.001,
                "{sample} → {back}"
            );
        }
        assert_eq!(encode(&[2.0, -2.0]), encode(&[1.0, -1.0]), "clipped");
    }

    fn temp_wav(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "callbridge-audio-{}-{name}.wav",
            std::process::id()
        ))
    }

    #[test]
    fn a_stereo_16_khz_wav_loads_as_8_khz_mulaw_of_the_same_length() {
        let path = temp_wav("stereo");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut writer = hound::WavWriter::create(&path, spec).unwrap();
        for byte in encode(&sine(500.0, 16_000, 32_000)) {
            let value = decode_sample(byte);
            writer.write_sample(value).unwrap();
            writer.write_sample(value).unwrap();
        }
        writer.finalize().unwrap();
        let mulaw = load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(mulaw.len().abs_diff(16_000) <= 1, "{}", mulaw.len());
        let silent_frames = mulaw
            .chunks(160)
            .filter(|frame| frame.iter().all(|&b| b == SILENCE))
            .count();
        assert_eq!(silent_frames, 0, "the tone is there from start to end");
    }

    /// A µ-law WAV as sox writes one (`-e u-law`): an 18-byte `fmt ` chunk, then `data`.
    fn mulaw_file(rate: u32, channels: u16, data: &[u8]) -> Vec<u8> {
        let mut fmt = Vec::new();
        fmt.extend_from_slice(&FORMAT_MULAW.to_le_bytes());
        fmt.extend_from_slice(&channels.to_le_bytes());
        fmt.extend_from_slice(&rate.to_le_bytes());
        fmt.extend_from_slice(&(rate * u32::from(channels)).to_le_bytes());
        fmt.extend_from_slice(&channels.to_le_bytes());
        fmt.extend_from_slice(&8u16.to_le_bytes());
        fmt.extend_from_slice(&0u16.to_le_bytes());
        let mut chunks = Vec::new();
        for (id, body) in [(b"fmt ", fmt.as_slice()), (b"data", data)] {
            chunks.extend_from_slice(id);
            chunks.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
            chunks.extend_from_slice(body);
            if body.len() % 2 == 1 {
                chunks.push(0);
            }
        }
        let mut file = b"RIFF".to_vec();
        file.extend_from_slice(&u32::try_from(chunks.len() + 4).unwrap().to_le_bytes());
        file.extend_from_slice(b"WAVE");
        file.extend_from_slice(&chunks);
        file
    }

    #[test]
    fn an_8_khz_mulaw_wav_is_sent_byte_for_byte() {
        let data: Vec<u8> = (0..=255).cycle().take(801).collect();
        let path = temp_wav("mulaw");
        std::fs::write(&path, mulaw_file(8000, 1, &data)).unwrap();
        let loaded = load(&path);
        std::fs::write(&path, mulaw_file(16_000, 1, &data)).unwrap();
        let wrong_rate = load(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded.unwrap(), data);
        assert!(
            matches!(
                wrong_rate,
                Err(AudioError::MulawFormat {
                    rate: 16_000,
                    channels: 1
                })
            ),
            "{wrong_rate:?}"
        );
    }

    #[test]
    fn unsupported_files_say_why() {
        let path = temp_wav("bad");
        std::fs::write(&path, b"not a wav at all").unwrap();
        let garbage = load(&path);
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 96_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut writer = hound::WavWriter::create(&path, spec).unwrap();
        writer.write_sample(0i16).unwrap();
        writer.finalize().unwrap();
        let too_fast = load(&path);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(garbage, Err(AudioError::Wav(_))), "{garbage:?}");
        assert!(
            matches!(too_fast, Err(AudioError::Rate(96_000))),
            "{too_fast:?}"
        );
        assert!(matches!(
            load(Path::new("/nonexistent/caller.wav")),
            Err(AudioError::Read(_))
        ));
    }

    #[test]
    fn what_was_heard_is_written_as_16_bit_mono_8_khz() {
        let path = temp_wav("heard");
        write_heard(&path, &[0, 1000, -1000, 0]).unwrap();
        let mut reader = hound::WavReader::open(&path).unwrap();
        let spec = reader.spec();
        let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            (spec.channels, spec.sample_rate, spec.bits_per_sample),
            (1, 8000, 16)
        );
        assert_eq!(samples, [0, 1000, -1000, 0]);
    }
}
