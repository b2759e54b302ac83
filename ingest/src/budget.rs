//! The memory budget: a cap on the memory that readings in flight hold,
//! from a device's socket until they are stored.
//!
//! Every publish charges its [`weight`] when it is accepted and gives it back
//! once its readings are written to storage. Admission, not the charge, is
//! where the server waits: a connection's publish service is *ready* only
//! while the budget has room, so when it is spent ntex-mqtt stops decoding,
//! reading pauses and TCP slows the device. A publish that was admitted is
//! charged in full without waiting, so no accepted publish is ever abandoned
//! halfway; the cap can be exceeded by at most one publish per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// What a publish will cost in memory until it is stored, in bytes: the
/// payload itself, and for each reading it carries a decoded reading, the
/// alert rules' copy of it and a buffered storage row (about 144 bytes
/// together). A binary frame says how many readings it carries; a SenML
/// record is rarely under 48 bytes.
pub fn weight(payload: &[u8]) -> usize {
    const PER_READING: usize = 144;
    let readings = match crate::codec::frame::header(payload) {
        Ok(h) => h.count,
        Err(_) => payload.len() / 48 + 1,
    };
    payload.len() + readings * PER_READING
}

pub struct MemoryBudget {
    capacity: u64,
    in_use: AtomicU64,
    freed: Notify,
    waits: AtomicU64,
}

/// Memory charged by one publish; returned on drop.
pub struct Permit {
    budget: Arc<MemoryBudget>,
    n: u64,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({})", self.n)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let before = self.budget.in_use.fetch_sub(self.n, Ordering::AcqRel);
        if before >= self.budget.capacity && before - self.n < self.budget.capacity {
            self.budget.freed.notify_waiters();
        }
    }
}

impl MemoryBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            capacity: bytes.max(1),
            in_use: AtomicU64::new(0),
            freed: Notify::new(),
            waits: AtomicU64::new(0),
        })
    }

    fn has_room(&self) -> bool {
        self.in_use.load(Ordering::Acquire) < self.capacity
    }

    /// The reserve: half the capacity again, for a publish whose payload
    /// is still arriving (its chunks must get through, or it would hold
    /// its connection forever).
    fn has_reserve(&self) -> bool {
        self.in_use.load(Ordering::Acquire) < self.capacity + self.capacity / 2
    }

    /// Waits until the budget's reserve has room.
    pub async fn wait_reserve(&self) {
        while !self.has_reserve() {
            self.waits.fetch_add(1, Ordering::Relaxed);
            // Freed memory is announced when use falls below the capacity;
            // the reserve is checked again every millisecond meanwhile.
            let freed = self.freed.notified();
            if self.has_reserve() {
                return;
            }
            let _ = ntex::time::timeout(Duration::from_millis(1), freed).await;
        }
    }

    /// Waits until the budget has room (admission).
    pub async fn wait_available(&self) {
        if self.has_room() {
            return;
        }
        self.waits.fetch_add(1, Ordering::Relaxed);
        loop {
            let freed = self.freed.notified();
            if self.has_room() {
                return;
            }
            freed.await;
        }
    }

    /// Charges `bytes` without waiting (the publish was admitted).
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Permit {
        let n = bytes.max(1) as u64;
        self.in_use.fetch_add(n, Ordering::AcqRel);
        Permit {
            budget: self.clone(),
            n,
        }
    }

    /// Waits for room, then charges `bytes` (for callers outside a
    /// connection, such as the log replay thread).
    pub fn charge_blocking(self: &Arc<Self>, bytes: usize) -> Permit {
        let mut waited = false;
        while !self.has_room() {
            if !waited {
                self.waits.fetch_add(1, Ordering::Relaxed);
                waited = true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.charge(bytes)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes currently charged.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// How many admissions had to wait (a measure of backpressure).
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_counts_the_readings_a_payload_becomes() {
        let mut frame = Vec::new();
        let rec = crate::codec::frame::Record::new(wardflow_model::Metric::Hr, 0, 60.0, 0);
        crate::codec::frame::encode(0, 0, &[rec; 50], &mut frame);
        assert_eq!(weight(&frame), frame.len() + 50 * 144);
        let senml = br#"[{"n":"hr","v":60}]"#;
        assert_eq!(weight(senml), senml.len() + 144);
    }

    #[test]
    fn charges_return_on_drop() {
        let b = MemoryBudget::new(100);
        let p = b.charge(60);
        let q = b.charge(60);
        assert_eq!(b.in_use(), 120, "an admitted publish is charged in full");
        drop(p);
        drop(q);
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn admission_waits_until_memory_is_freed() {
        let b = MemoryBudget::new(10);
        let held = b.charge(10);
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            b2.wait_available().await;
            b2.charge(5)
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        let p = waiter.await.unwrap();
        assert_eq!(p.n, 5);
        assert_eq!(b.waits(), 1);
    }
}
