//! The accesses in force (patients' consents and break-glass access), as
//! the console needs them: may this clinician see this patient now?
//!
//! The dataflow keeps the same accesses as a differential collection for
//! the alert feeds; the console reads a copy, fed from the same changes
//! on their way to the dataflow, so both follow one source.

use std::collections::HashSet;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use wardflow_ledger_bridge::consent::{Access, covers};

use crate::dataflow::ConsentChange;

#[derive(Default)]
pub struct AccessView {
    accesses: Mutex<HashSet<Access>>,
}

impl AccessView {
    /// Reads changes from `changes`, keeps them, and passes them on to the
    /// channel it returns (the dataflow's). The thread ends with the
    /// senders of `changes`.
    pub fn tee(
        self: &Arc<Self>,
        changes: Receiver<ConsentChange>,
    ) -> std::io::Result<Receiver<ConsentChange>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let view = self.clone();
        std::thread::Builder::new()
            .name("console-access".into())
            .spawn(move || {
                for c in changes {
                    view.apply(&c);
                    if tx.send(c).is_err() {
                        break;
                    }
                }
            })?;
        Ok(rx)
    }

    pub fn apply(&self, change: &ConsentChange) {
        let mut all = self.accesses.lock();
        match change {
            ConsentChange::Open(a) => {
                all.insert(a.clone());
            }
            ConsentChange::Close(a) => {
                all.remove(a);
            }
        }
    }

    /// The access that lets `clinician` see `patient`'s vitals at `now_ms`
    /// for care (a treatment consent or break-glass), if any.
    pub fn for_clinician(&self, patient: &str, clinician: &str, now_ms: u64) -> Option<Access> {
        self.accesses
            .lock()
            .iter()
            .filter(|a| {
                a.patient == patient
                    && a.grantee == clinician
                    && (a.purpose == "treatment" || a.purpose == "emergency")
                    && covers(&a.scope, "vitals")
                    && now_ms < a.not_after_ms
            })
            // Break-glass first: it is what the audit trail must name.
            .max_by_key(|a| (a.purpose == "emergency", a.not_after_ms))
            .cloned()
    }

    /// The patients some access lets `clinician` see at `now_ms`.
    pub fn patients_of(&self, clinician: &str, now_ms: u64) -> Vec<String> {
        let mut v: Vec<String> = self
            .accesses
            .lock()
            .iter()
            .filter(|a| {
                a.grantee == clinician
                    && (a.purpose == "treatment" || a.purpose == "emergency")
                    && covers(&a.scope, "vitals")
                    && now_ms < a.not_after_ms
            })
            .map(|a| a.patient.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(purpose: &str, scope: &str, not_after_ms: u64) -> Access {
        Access {
            patient: "p-1".into(),
            grantee: "rn-b".into(),
            purpose: purpose.into(),
            scope: vec![scope.into()],
            not_after_ms,
            version: "g@1".into(),
        }
    }

    #[test]
    fn only_care_accesses_covering_vitals_in_time_count() {
        let v = AccessView::default();
        v.apply(&ConsentChange::Open(access("research:s", "all", 100)));
        v.apply(&ConsentChange::Open(access("treatment", "alerts", 100)));
        assert!(v.for_clinician("p-1", "rn-b", 10).is_none());
        let t = access("treatment", "vitals", 100);
        v.apply(&ConsentChange::Open(t.clone()));
        assert_eq!(v.for_clinician("p-1", "rn-b", 10), Some(t.clone()));
        assert!(v.for_clinician("p-1", "rn-b", 100).is_none(), "expired");
        assert!(v.for_clinician("p-1", "rn-c", 10).is_none());
        assert_eq!(v.patients_of("rn-b", 10), vec!["p-1".to_string()]);
        v.apply(&ConsentChange::Close(t));
        assert!(v.for_clinician("p-1", "rn-b", 10).is_none());
        assert!(v.patients_of("rn-b", 10).is_empty());
    }
}
