//! The one task that writes the bridge's records, so audio never waits on the database.
//!
//! Calls hand records over a bounded queue. Most records are dropped (and counted) if the queue
//! is ever full; transcript lines are not: the call waits for room instead, which only happens
//! if the database falls far behind, and is counted too. The writer commits each batch as soon
//! as it has it, so a line is durable well within a second of being produced.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Record, Store};
use crate::clock::Clock;
use crate::metrics::Metrics;

const QUEUE_CAPACITY: usize = 4096;
const MAX_BATCH: usize = 512;
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(800),
];
const TOKEN_PURGE_INTERVAL: Duration = Duration::from_secs(60);

enum Command {
    Write(Record),
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct RecordWriter {
    queue: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
}

impl RecordWriter {
    pub fn spawn(store: Store, metrics: Arc<Metrics>, clock: Arc<dyn Clock>) -> Self {
        let (queue, commands) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(write_loop(store, commands, Arc::clone(&metrics), clock));
        Self { queue, metrics }
    }

    /// Never waits: if the writer is hopelessly behind, the record is dropped and counted.
    pub fn record(&self, record: Record) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(Command::Write(record))
        {
            self.metrics.store_records_dropped.inc();
        }
    }

    /// Waits for room rather than lose the record: transcript lines, and a call's start and
    /// end, which the business's events are made of.
    pub async fn record_durably(&self, record: Record) {
        match self.queue.try_send(Command::Write(record)) {
            Err(mpsc::error::TrySendError::Full(command)) => {
                self.metrics.store_transcript_waits.inc();
                let _ = self.queue.send(command).await;
            }
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Resolves once everything queued before it is committed (or has failed for good).
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(Command::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }
}

async fn write_loop(
    store: Store,
    mut commands: mpsc::Receiver<Command>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
) {
    let mut purge = tokio::time::interval(TOKEN_PURGE_INTERVAL);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut flushes = Vec::new();
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { break };
                let mut next = Some(command);
                while let Some(command) = next.take() {
                    match command {
                        Command::Write(record) => batch.push(record),
                        Command::Flush(done) => flushes.push(done),
                    }
                    if batch.len() < MAX_BATCH {
                        next = commands.try_recv().ok();
                    }
                }
                write_batch(&store, &batch, &metrics).await;
                batch.clear();
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
            _ = purge.tick() => {
                if let Err(error) = store.purge_expired_tokens(clock.now_ms()).await {
                    tracing::warn!(error = format!("{error:#}"), "cannot purge expired stream tokens");
                }
            }
        }
    }
}

async fn write_batch(store: &Store, batch: &[Record], metrics: &Metrics) {
    if batch.is_empty() {
        return;
    }
    let mut delays = RETRY_DELAYS.iter();
    loop {
        match store.apply(batch).await {
            Ok(()) => return,
            Err(error) => match delays.next() {
                Some(delay) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "database write failed; retrying"
                    );
                    tokio::time::sleep(*delay).await;
                }
                None => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        records = batch.len(),
                        "database write failed; trying the records one by one"
                    );
                    // One bad record must not take the rest of the batch with it.
                    for record in batch {
                        if let Err(error) = store.apply(std::slice::from_ref(record)).await {
                            metrics.store_write_failures.inc();
                            tracing::error!(
                                error = format!("{error:#}"),
                                "a record could not be stored"
                            );
                        }
                    }
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use callbridge_testkit::scratch::Scratch;

    use super::*;
    use crate::call::transcript::{Speaker, TranscriptLine};
    use crate::clock::SystemClock;

    fn event(n: usize) -> Record {
        Record::Event {
            call_sid: "CA1".into(),
            kind: "stream",
            name: format!("event {n}"),
            detail: None,
            data: None,
            at_ms: 0,
        }
    }

    // On the current-thread runtime the writer cannot run until the test awaits, so the queue
    // fills exactly as it would behind a stalled database.
    #[tokio::test]
    async fn a_full_queue_drops_records_but_waits_for_transcript_lines() {
        let scratch = Scratch::new();
        let store = Store::connect(&scratch.sqlite_url()).await.unwrap();
        let metrics = Arc::new(Metrics::default());
        let writer =
            RecordWriter::spawn(store.clone(), Arc::clone(&metrics), Arc::new(SystemClock));
        for n in 0..QUEUE_CAPACITY + 3 {
            writer.record(event(n));
        }
        assert_eq!(metrics.store_records_dropped.get(), 3);

        let line = TranscriptLine {
            sequence: 1,
            speaker: Speaker::Caller,
            text: "kept".into(),
            offset_ms: 0,
            truncated: false,
        };
        writer
            .record_durably(Record::Transcript {
                call_sid: "CA1".into(),
                line,
            })
            .await;
        assert_eq!(metrics.store_transcript_waits.get(), 1);
        writer.flush().await;
        let lines: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM transcript_lines WHERE text = 'kept'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(lines, 1, "the transcript line was not lost");
    }
}
