//! The memory budget: a cap on the payload bytes in flight between a
//! device's socket and the storage stage.
//!
//! Every publish takes permits for its size before it is logged and gives
//! them back when the dataflow has consumed it. When the budget is spent,
//! the connection handlers wait, ntex-mqtt stops reading their sockets, and
//! TCP pushes back on the devices: overload slows senders instead of growing
//! memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

pub struct MemoryBudget {
    sem: Semaphore,
    capacity: u32,
    waits: AtomicU64,
}

/// Permits held by one publish; returned on drop.
pub struct Permit {
    budget: Arc<MemoryBudget>,
    n: u32,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({})", self.n)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.sem.add_permits(self.n as usize);
    }
}

impl MemoryBudget {
    /// A budget of `bytes` (at most 4 GiB - 1).
    pub fn new(bytes: u64) -> Arc<MemoryBudget> {
        let capacity = bytes.clamp(1, u32::MAX as u64) as u32;
        Arc::new(MemoryBudget {
            sem: Semaphore::new(capacity as usize),
            capacity,
            waits: AtomicU64::new(0),
        })
    }

    fn amount(&self, bytes: usize) -> u32 {
        // A payload larger than the whole budget takes the whole budget.
        (bytes.max(1) as u64).min(self.capacity as u64) as u32
    }

    /// Waits for `bytes` of budget.
    pub async fn acquire(self: &Arc<Self>, bytes: usize) -> Permit {
        let n = self.amount(bytes);
        match self.sem.try_acquire_many(n) {
            Ok(p) => p.forget(),
            Err(_) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                self.sem
                    .acquire_many(n)
                    .await
                    .expect("the budget semaphore is never closed")
                    .forget();
            }
        }
        Permit {
            budget: self.clone(),
            n,
        }
    }

    /// Takes `bytes` of budget from a thread outside any runtime (log replay).
    pub fn acquire_blocking(self: &Arc<Self>, bytes: usize) -> Permit {
        let n = self.amount(bytes);
        let mut waited = false;
        loop {
            if let Ok(p) = self.sem.try_acquire_many(n) {
                p.forget();
                return Permit {
                    budget: self.clone(),
                    n,
                };
            }
            if !waited {
                self.waits.fetch_add(1, Ordering::Relaxed);
                waited = true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    /// Bytes currently held.
    pub fn in_use(&self) -> u64 {
        self.capacity as u64 - self.sem.available_permits() as u64
    }

    /// How many acquisitions had to wait (a measure of backpressure).
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_return_on_drop_and_oversized_requests_take_everything() {
        let b = MemoryBudget::new(100);
        let p = b.acquire_blocking(60);
        assert_eq!(b.in_use(), 60);
        drop(p);
        assert_eq!(b.in_use(), 0);
        let q = b.acquire_blocking(1_000);
        assert_eq!(q.n, 100);
        assert_eq!(b.in_use(), 100);
        drop(q);
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn acquire_waits_for_release() {
        let b = MemoryBudget::new(10);
        let held = b.acquire(10).await;
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire(5).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        let p = waiter.await.unwrap();
        assert_eq!(p.n, 5);
        assert_eq!(b.waits(), 1);
    }
}
