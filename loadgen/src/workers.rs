//! One single-threaded tokio runtime per core, each on its own thread: the layout actix gives
//! callbridge, and one that needs no cross-thread scheduling (the crate's tokio has no
//! multi-threaded runtime outside the tests anyway).

use std::future::Future;
use std::thread::JoinHandle;

/// How many worker threads to run: one per core the process may use.
pub fn count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Threads started by `spawn`, each running one future to completion.
pub struct Workers<T> {
    threads: Vec<JoinHandle<T>>,
}

/// Starts one thread per item, running `make(item)` on that thread's own runtime.
pub fn spawn<I, F, Fut>(items: Vec<I>, make: F) -> Workers<Fut::Output>
where
    I: Send + 'static,
    F: FnOnce(I) -> Fut + Clone + Send + 'static,
    Fut: Future,
    Fut::Output: Send + 'static,
{
    let threads = items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let make = make.clone();
            std::thread::Builder::new()
                .name(format!("loadgen-{index}"))
                .spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a tokio runtime can be built")
                        .block_on(make(item))
                })
                .expect("a thread can be started")
        })
        .collect();
    Workers { threads }
}

impl<T> Workers<T> {
    /// Waits for every thread; a panic in one is re-raised here.
    pub fn join(self) -> Vec<T> {
        self.threads
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
            .collect()
    }
}
