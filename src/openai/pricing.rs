//! What a call's tokens cost, estimated from OpenAI's published prices of the Realtime models
//! this bridge knows. An unknown model has no estimate rather than a wrong one.

use crate::openai::events::Usage;

/// Prices in nano-dollars per token, which is dollars per million tokens times 1,000: every
/// published price is then a whole number and the sum is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prices {
    text_in: u64,
    text_cached: u64,
    text_out: u64,
    audio_in: u64,
    audio_cached: u64,
    audio_out: u64,
}

/// Dollars per million tokens, as OpenAI lists them, times 1,000.
const fn per_million(text: [u64; 3], audio: [u64; 3]) -> Prices {
    Prices {
        text_in: text[0],
        text_cached: text[1],
        text_out: text[2],
        audio_in: audio[0],
        audio_cached: audio[1],
        audio_out: audio[2],
    }
}

/// Each model's prices: text in / cached / out, audio in / cached / out.
const PRICE_TABLE: &[(&str, Prices)] = &[
    (
        "gpt-realtime",
        per_million([4_000, 400, 16_000], [32_000, 400, 64_000]),
    ),
    (
        "gpt-realtime-1.5",
        per_million([4_000, 400, 16_000], [32_000, 400, 64_000]),
    ),
    (
        "gpt-realtime-2",
        per_million([4_000, 400, 24_000], [32_000, 400, 64_000]),
    ),
    (
        "gpt-realtime-2.1",
        per_million([4_000, 400, 24_000], [32_000, 400, 64_000]),
    ),
    (
        "gpt-realtime-mini",
        per_million([600, 60, 2_400], [10_000, 300, 20_000]),
    ),
    (
        "gpt-realtime-2.1-mini",
        per_million([600, 60, 2_400], [10_000, 300, 20_000]),
    ),
    (
        "gpt-4o-realtime-preview",
        per_million([5_000, 2_500, 20_000], [40_000, 2_500, 80_000]),
    ),
];

/// The estimated cost in micro-dollars of `usage` on `model` (a dated snapshot such as
/// `gpt-realtime-2025-08-28` is priced as its model), or `None` for a model not in the table.
pub fn cost_micro_usd(model: &str, usage: &Usage) -> Option<u64> {
    let prices = prices(model)?;
    let uncached_text = usage
        .input_text_tokens
        .saturating_sub(usage.input_cached_text_tokens);
    let uncached_audio = usage
        .input_audio_tokens
        .saturating_sub(usage.input_cached_audio_tokens);
    let nano = uncached_text * prices.text_in
        + usage.input_cached_text_tokens * prices.text_cached
        + usage.output_text_tokens * prices.text_out
        + uncached_audio * prices.audio_in
        + usage.input_cached_audio_tokens * prices.audio_cached
        + usage.output_audio_tokens * prices.audio_out;
    Some(nano.div_ceil(1_000))
}

fn prices(model: &str) -> Option<Prices> {
    let model = without_snapshot_date(model);
    PRICE_TABLE
        .iter()
        .find(|(name, _)| *name == model)
        .map(|(_, prices)| *prices)
}

/// `name-YYYY-MM-DD` → `name`.
fn without_snapshot_date(model: &str) -> &str {
    let bytes = model.as_bytes();
    let dated = bytes.len() > 11 && {
        let date = &bytes[bytes.len() - 11..];
        date.iter().enumerate().all(|(i, b)| match i {
            0 | 5 | 8 => *b == b'-',
            _ => b.is_ascii_digit(),
        })
    };
    if dated {
        &model[..model.len() - 11]
    } else {
        model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage() -> Usage {
        Usage {
            input_text_tokens: 1_000_000,
            input_cached_text_tokens: 400_000,
            input_audio_tokens: 2_000_000,
            input_cached_audio_tokens: 500_000,
            output_text_tokens: 100_000,
            output_audio_tokens: 1_000_000,
            ..Usage::default()
        }
    }

    #[test]
    fn each_kind_is_priced_at_its_own_rate() {
        // gpt-realtime: 0.6 M text in at $4 = 2.40, 0.4 M cached text at $0.40 = 0.16,
        // 0.1 M text out at $16 = 1.60, 1.5 M audio in at $32 = 48, 0.5 M cached audio at
        // $0.40 = 0.20, 1 M audio out at $64 = 64: $116.36.
        assert_eq!(cost_micro_usd("gpt-realtime", &usage()), Some(116_360_000));
        // The mini model: 0.36 + 0.024 + 0.24 + 15 + 0.15 + 20 = $35.774.
        assert_eq!(
            cost_micro_usd("gpt-realtime-mini", &usage()),
            Some(35_774_000)
        );
        // gpt-realtime-2 differs only in text out ($24): 116.36 + 0.80.
        assert_eq!(
            cost_micro_usd("gpt-realtime-2", &usage()),
            Some(117_160_000)
        );
    }

    #[test]
    fn a_dated_snapshot_is_priced_as_its_model_and_an_unknown_model_not_at_all() {
        assert_eq!(
            cost_micro_usd("gpt-realtime-2025-08-28", &usage()),
            cost_micro_usd("gpt-realtime", &usage())
        );
        assert_eq!(cost_micro_usd("gpt-realtime-9", &usage()), None);
        assert_eq!(cost_micro_usd("gpt-realtime-20", &usage()), None);
        assert_eq!(cost_micro_usd("", &usage()), None);
    }

    #[test]
    fn a_few_tokens_cost_at_least_a_micro_dollar_and_none_cost_nothing() {
        let one = Usage {
            output_audio_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(cost_micro_usd("gpt-realtime", &one), Some(64));
        assert_eq!(cost_micro_usd("gpt-realtime", &Usage::default()), Some(0));
        let tiny = Usage {
            input_cached_text_tokens: 1,
            input_text_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(cost_micro_usd("gpt-realtime-mini", &tiny), Some(1));
    }
}
