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
//!
//! Admission is fair to light senders: a connection that holds less than
//! its [`MemoryBudget::light_share`] (a bedside monitor's few readings a
//! second hold a few kilobytes until stored) is admitted from the reserve
//! when the budget is spent, so a patient's monitor keeps flowing while the
//! heavy senders that spent the budget wait. The reserve still bounds the
//! total.

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

/// What one connection holds of the budget: its publishes admitted and not
/// yet stored.
#[derive(Debug, Default)]
pub struct Share {
    held: AtomicU64,
}

impl Share {
    pub fn new() -> Arc<Share> {
        Arc::new(Share::default())
    }

    /// Bytes this connection's publishes hold.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

/// Memory charged by one publish; returned on drop.
pub struct Permit {
    budget: Arc<MemoryBudget>,
    n: u64,
    share: Option<Arc<Share>>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({})", self.n)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = &self.share {
            s.held.fetch_sub(self.n, Ordering::AcqRel);
        }
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
            share: None,
        }
    }

    /// Charges `bytes` to the budget and to a connection's share.
    pub fn charge_to(self: &Arc<Self>, bytes: usize, share: &Arc<Share>) -> Permit {
        let mut p = self.charge(bytes);
        share.held.fetch_add(p.n, Ordering::AcqRel);
        p.share = Some(share.clone());
        p
    }

    /// What a connection may hold and still be admitted from the reserve:
    /// 1/1024 of the budget (256 KiB of the default), at least 16 KiB.
    pub fn light_share(&self) -> u64 {
        (self.capacity / 1024).max(16 << 10)
    }

    /// Waits until a publish of the connection holding `share` may be
    /// admitted: while the budget has room, or from the reserve while the
    /// connection is a light sender.
    pub async fn wait_admission(&self, share: &Share) {
        if share.held() < self.light_share() {
            self.wait_reserve().await;
        } else {
            self.wait_available().await;
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

    /// A light sender is admitted from the reserve while the budget is
    /// spent; a heavy one waits for the budget; the reserve bounds both.
    #[tokio::test(flavor = "current_thread")]
    async fn light_senders_pass_while_heavy_ones_wait() {
        // The reserve's wait uses ntex's timer, which needs a local set.
        tokio::task::LocalSet::new()
            .run_until(light_and_heavy())
            .await;
    }

    async fn light_and_heavy() {
        let b = MemoryBudget::new(1 << 20);
        let (light, heavy) = (Share::new(), Share::new());
        let spent = b.charge_to(1 << 20, &heavy);
        assert_eq!(heavy.held(), 1 << 20);
        assert!(b.light_share() < 1 << 20);

        let held = b.charge_to(100, &light);
        let b2 = b.clone();
        let l2 = light.clone();
        let light_waiter = tokio::task::spawn_local(async move { b2.wait_admission(&l2).await });
        let b3 = b.clone();
        let h3 = heavy.clone();
        let heavy_waiter = tokio::task::spawn_local(async move { b3.wait_admission(&h3).await });
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(light_waiter.is_finished(), "the light sender is admitted");
        assert!(!heavy_waiter.is_finished(), "the heavy sender waits");

        // The reserve is half the budget again: past it the light sender
        // waits too.
        let reserve = b.charge(1 << 19);
        let b4 = b.clone();
        let l4 = light.clone();
        let late = tokio::task::spawn_local(async move { b4.wait_admission(&l4).await });
        tokio::task::yield_now().await;
        assert!(!late.is_finished(), "the reserve is spent");
        drop(reserve);
        late.await.unwrap();

        drop(held);
        assert_eq!(
            light.held(),
            0,
            "a stored publish leaves its connection's share"
        );
        drop(spent);
        heavy_waiter.await.unwrap();
        assert_eq!((b.in_use(), heavy.held()), (0, 0));
    }
}
