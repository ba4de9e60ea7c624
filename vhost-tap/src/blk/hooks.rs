//! Fault points on the path of recorded large writes, which the unit tests
//! arm to fail a copy from guest memory, hold or kill the image writer. In
//! any other build they never fire and compile to nothing.

#[cfg(not(test))]
#[derive(Debug, Default)]
pub(crate) struct Hooks;

#[cfg(not(test))]
impl Hooks {
    /// Whether the copy of the write at `sector` from guest memory fails.
    #[inline(always)]
    pub(crate) fn copy_fails(&self, _sector: u64) -> bool {
        false
    }

    /// Called by the image writer before it writes the write at `sector`.
    #[inline(always)]
    pub(crate) fn before_write(&self, _sector: u64) {}

    /// Called by the device thread before it hands the write at `sector`
    /// to the image writer; `writer_gone` says whether its thread ended.
    #[inline(always)]
    pub(crate) fn before_submit(&self, _sector: u64, _writer_gone: impl Fn() -> bool) {}

    /// Called once the device thread handled a large write on the writer
    /// path.
    #[inline(always)]
    pub(crate) fn deferred(&self) {}
}

#[cfg(test)]
pub(crate) use armed::Hooks;

#[cfg(test)]
mod armed {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// Longest a fault point holds a thread.
    const HOLD_MAX: Duration = Duration::from_secs(10);

    #[derive(Debug, Default)]
    pub(crate) struct Hooks {
        /// The copy of the write at this sector fails.
        pub fail_copy_at: Mutex<Option<u64>>,
        /// The image writer panics when it takes the write at this sector.
        pub panic_at: Mutex<Option<u64>>,
        /// The image writer waits before each write while this is set.
        pub hold: AtomicBool,
        /// When the device thread is about to hand the write at this
        /// sector over, it lifts `hold` and waits until the writer's thread
        /// ended.
        pub submit_after_exit_at: Mutex<Option<u64>>,
        /// Large writes the device thread handled on the writer path.
        pub deferred: AtomicU64,
    }

    fn is(at: &Mutex<Option<u64>>, sector: u64) -> bool {
        *at.lock().unwrap_or_else(|p| p.into_inner()) == Some(sector)
    }

    fn wait(cond: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !cond() && t0.elapsed() < HOLD_MAX {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    impl Hooks {
        pub(crate) fn copy_fails(&self, sector: u64) -> bool {
            is(&self.fail_copy_at, sector)
        }

        pub(crate) fn before_write(&self, sector: u64) {
            wait(|| !self.hold.load(Ordering::Acquire));
            if is(&self.panic_at, sector) {
                panic!("injected image writer failure at sector {sector}");
            }
        }

        pub(crate) fn before_submit(&self, sector: u64, writer_gone: impl Fn() -> bool) {
            if is(&self.submit_after_exit_at, sector) {
                self.hold.store(false, Ordering::Release);
                wait(writer_gone);
            }
        }

        pub(crate) fn deferred(&self) {
            self.deferred.fetch_add(1, Ordering::AcqRel);
        }
    }
}
