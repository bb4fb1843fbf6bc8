//! Work spread over every core, for the few operations that visit every
//! site: a full compile, a plan or a recompile after a change of settings,
//! a segment or a policy.

/// Below this many items one thread does it: threads cost more than a
/// change of a few sites saves.
pub const PARALLEL_FROM: usize = 256;

/// `f` of every item, in order; many items on every core, in small pieces
/// taken in turn (an access point costs as much as thousands of member
/// sites, so equal halves would not be equal work).
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if items.len() < PARALLEL_FROM || threads < 2 {
        return items.iter().map(f).collect();
    }
    let pieces: Vec<&[T]> = items.chunks(32).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(piece) = pieces.get(i) else { return done };
                        done.push((i, piece.iter().map(&f).collect::<Vec<_>>()));
                    }
                })
            })
            .collect();
        let mut done = Vec::with_capacity(pieces.len());
        for w in workers {
            // The work does not panic; if it did, say so where it happened.
            done.extend(w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        done.sort_by_key(|(i, _)| *i);
        done.into_iter().flat_map(|(_, piece)| piece).collect()
    })
}

/// Drops `value`, which holds `items` things (compiled configurations,
/// say), on a thread of its own when they are many: freeing 10,000
/// configurations takes a good part of a second, not to be spent on an
/// operator's or an agent's time. A few are dropped here.
pub fn free<T: Send + 'static>(value: T, items: usize) {
    if items < PARALLEL_FROM {
        return;
    }
    // One thread frees in turn whatever is handed to it: starting a thread
    // per value cost more than a small value's freeing.
    type Garbage = Box<dyn Send>;
    static FREER: std::sync::OnceLock<std::sync::mpsc::Sender<Garbage>> = std::sync::OnceLock::new();
    let tx = FREER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Garbage>();
        // Should no thread be had, `rx` is gone with the closure, `send`
        // fails below and each value is freed where it was handed over.
        std::thread::Builder::new()
            .name("musubi-free".into())
            .spawn(move || {
                for garbage in rx {
                    drop(garbage);
                }
            })
            .ok();
        tx
    });
    let garbage: Garbage = Box::new(value);
    let sent = tx.send(garbage);
    drop(sent);
}

/// Lets go of a shared `value` holding `items` things: when this was its
/// last holder it is freed as [`free`] frees (an intent of 10,000 sites
/// replaced by the next one takes a millisecond or two to free, not to be
/// spent before an operator's answer), else only the count goes down.
pub fn release<T: Send + Sync + 'static>(value: std::sync::Arc<T>, items: usize) {
    if let Some(last) = std::sync::Arc::into_inner(value) {
        free(last, items);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_the_order_of_many_items() {
        let items: Vec<u64> = (0..10_000).collect();
        let out = super::map(&items, |x| x * 3);
        assert_eq!(out, items.iter().map(|x| x * 3).collect::<Vec<_>>());
        assert_eq!(super::map(&items[..5], |x| x + 1), vec![1, 2, 3, 4, 5]);
    }

    /// Dropped where it was last held, whichever thread frees it.
    struct Counted(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_released_value_is_freed_once_by_its_last_holder() {
        let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let shared = std::sync::Arc::new(Counted(drops.clone()));
        super::release(shared.clone(), super::PARALLEL_FROM);
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 0, "still held: not freed");
        super::release(shared, super::PARALLEL_FROM);
        // Freed on a thread of its own: bounded wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while drops.load(std::sync::atomic::Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 1);
        super::release(std::sync::Arc::new(Counted(drops.clone())), 1);
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 2, "a small value is freed at once");
    }
}
