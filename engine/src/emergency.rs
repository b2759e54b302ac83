//! Break-glass: emergency access to a patient's data without consent.
//!
//! `wardflow emergency open --patient P --clinician C --reason TEXT
//! [--minutes 60]` records the access, at once and durably, in three
//! places before it returns:
//!
//! 1. `ledger/emergencies.jsonl` (fsynced), which the engine (process 0)
//!    follows: the access opens in the dataflow's consent collection
//!    (purpose `emergency`, scope `all`, version `emergency:<id>`), so the
//!    clinician gets the patient's alerts from the next transition, and the
//!    patient is told on `wardflow/v1/patients/{id}/notifications`;
//! 2. the audit trail, as an access request (action `emergency-open`, with
//!    the reason), sealed in the next batch;
//! 3. with a chain configured, a `WFE1` remark signed by the node's
//!    account, its block recorded in `ledger/emergency-chain.jsonl`. If the
//!    chain cannot be reached the access still opens (care comes first) and
//!    `emergency list` shows it as not on chain.
//!
//! The access ends by itself at its time: the consent collection drops it,
//! and the patient is told. `wardflow emergency list` shows open and past
//! ones for review.
//!
//! Patients sign in to MQTT as `patient:{id}` with a password made by
//! [`login_password`] from their chain key (the account registered for
//! them): `{unix ms}:{sr25519 signature of "wardflow-login:{id}:{ms}"}`,
//! good for five minutes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};
use wardflow_ingest::feeds::AlertHub;
use wardflow_ledger_bridge::anchor::JsonLinesTail;
use wardflow_ledger_bridge::chain::{Keypair, load_signer, submit_remark_blocking};
use wardflow_ledger_bridge::consent::{Access, AccountRegistry, unhex};
use wardflow_ledger_bridge::events::AccessRequest;
use wardflow_ledger_bridge::{hex, now_ms};

use crate::config::Config;
use crate::dataflow::ConsentChange;

/// The prefix of an emergency access's remark on the chain.
pub const EMERGENCY_PREFIX: &[u8; 4] = b"WFE1";
/// How long a patient's sign-in statement is good for.
const LOGIN_WINDOW_MS: u64 = 5 * 60_000;

/// One emergency access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emergency {
    pub id: String,
    pub patient: String,
    pub clinician: String,
    pub reason: String,
    /// Who opened it (the operator's user name).
    pub by: String,
    pub opened_ms: u64,
    pub not_after_ms: u64,
}

impl Emergency {
    pub fn access(&self) -> Access {
        Access {
            patient: self.patient.clone(),
            grantee: self.clinician.clone(),
            purpose: "emergency".into(),
            scope: vec!["all".into()],
            not_after_ms: self.not_after_ms,
            version: format!("emergency:{}", self.id),
        }
    }
}

/// Where it landed on the chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmergencyReceipt {
    pub id: String,
    pub block_number: u64,
    pub block_hash: String,
    pub extrinsic_index: u32,
}

fn emergencies_path(dir: &Path) -> PathBuf {
    dir.join("emergencies.jsonl")
}

fn receipts_path(dir: &Path) -> PathBuf {
    dir.join("emergency-chain.jsonl")
}

fn append_line(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    Ok(wardflow_ledger_bridge::anchor::append_json_lines(
        path,
        std::slice::from_ref(value),
    )?)
}

fn read_all(dir: &Path) -> anyhow::Result<Vec<Emergency>> {
    Ok(wardflow_ledger_bridge::anchor::read_json_lines(
        &emergencies_path(dir),
    )?)
}

#[derive(Subcommand, Debug)]
pub enum EmergencyCommand {
    /// Open time-limited access to a patient's data without consent (break-glass)
    Open {
        #[arg(long)]
        patient: String,
        #[arg(long)]
        clinician: String,
        /// Why: kept in the audit trail and on the chain, and shown to the patient
        #[arg(long)]
        reason: String,
        #[arg(long, default_value_t = 60)]
        minutes: u64,
    },
    /// Open and past emergency accesses, for review
    List {
        #[arg(long)]
        patient: Option<String>,
    },
}

pub fn run(config: &Config, cmd: &EmergencyCommand) -> anyhow::Result<()> {
    let dir = config.ledger_dir();
    match cmd {
        EmergencyCommand::Open {
            patient,
            clinician,
            reason,
            minutes,
        } => {
            if reason.trim().is_empty() {
                bail!("--reason must say why");
            }
            if *minutes == 0 || *minutes > 24 * 60 {
                bail!("--minutes must be between 1 and 1440");
            }
            let census = wardflow_ingest::census::Clinicians::load(&config.data_dir)?;
            if !census.clinicians.contains_key(clinician) {
                bail!("no clinician {clinician}");
            }
            let opened_ms = now_ms();
            let mut id = [0u8; 8];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                .map_err(|_| anyhow::anyhow!("no randomness"))?;
            let e = Emergency {
                id: hex(&id),
                patient: patient.clone(),
                clinician: clinician.clone(),
                reason: reason.clone(),
                by: std::env::var("USER").unwrap_or_else(|_| "operator".into()),
                opened_ms,
                not_after_ms: opened_ms + minutes * 60_000,
            };
            append_line(&emergencies_path(&dir), &e)?;
            AccessRequest {
                id: format!("emergency-{}", e.id),
                at_ns: (opened_ms as i64) * 1_000_000,
                patient: e.patient.clone(),
                actor: format!("clinician:{}", e.clinician),
                action: "emergency-open".into(),
                purpose: "emergency".into(),
                detail: format!(
                    "emergency {} for {minutes} min, opened by {}: {}",
                    e.id, e.by, e.reason
                ),
            }
            .submit(&dir)?;
            println!(
                "emergency {} open: {} may receive {}'s data until {}",
                e.id,
                e.clinician,
                e.patient,
                jiff::Timestamp::from_millisecond(e.not_after_ms as i64)?
            );
            if let Some(url) = &config.ledger.url {
                match anchor(config, url, &e) {
                    Ok(r) => {
                        println!(
                            "on the chain: block #{} {} extrinsic {}",
                            r.block_number, r.block_hash, r.extrinsic_index
                        );
                        append_line(&receipts_path(&dir), &r)?;
                    }
                    Err(err) => eprintln!(
                        "warning: the access is open and audited, but not on the chain: {err:#}"
                    ),
                }
            }
            Ok(())
        }
        EmergencyCommand::List { patient } => {
            let receipts: HashMap<String, EmergencyReceipt> =
                wardflow_ledger_bridge::anchor::read_json_lines::<EmergencyReceipt>(
                    &receipts_path(&dir),
                )?
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect();
            let now = now_ms();
            println!("id\tpatient\tclinician\topened\tuntil\tstate\tchain\tby\treason");
            for e in read_all(&dir)? {
                if patient.as_ref().is_some_and(|p| *p != e.patient) {
                    continue;
                }
                let ts = |ms: u64| {
                    jiff::Timestamp::from_millisecond(ms as i64)
                        .map(|t| t.to_string())
                        .unwrap_or_default()
                };
                let chain = receipts.get(&e.id).map_or("not on chain".to_string(), |r| {
                    format!("block #{}", r.block_number)
                });
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    e.id,
                    e.patient,
                    e.clinician,
                    ts(e.opened_ms),
                    ts(e.not_after_ms),
                    if now < e.not_after_ms {
                        "open"
                    } else {
                        "closed"
                    },
                    chain,
                    e.by,
                    e.reason
                );
            }
            Ok(())
        }
    }
}

/// Submits the emergency's remark, signed by the node's account.
fn anchor(config: &Config, url: &str, e: &Emergency) -> anyhow::Result<EmergencyReceipt> {
    let signer = load_signer(&config.ledger_suri()?).map_err(anyhow::Error::msg)?;
    let mut payload = EMERGENCY_PREFIX.to_vec();
    payload.extend_from_slice(&serde_json::to_vec(e)?);
    let timeout = Duration::from_secs(config.ledger.finality_timeout_s.max(1));
    // The running engine signs with the same account: a clash of nonces
    // fails one of the two, and it is sent again.
    let mut last = String::new();
    for _ in 0..3 {
        match submit_remark_blocking(url, &signer, payload.clone(), timeout) {
            Ok((block_hash, block_number, extrinsic_index)) => {
                return Ok(EmergencyReceipt {
                    id: e.id.clone(),
                    block_number,
                    block_hash,
                    extrinsic_index,
                });
            }
            Err(err) => last = err,
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("{last}")
}

/// Follows the emergencies file (process 0): opens each access in the
/// dataflow and tells the patient, and tells them again when it ends.
pub fn spawn_watcher(
    dir: PathBuf,
    hub: Arc<AlertHub>,
    changes: Sender<ConsentChange>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("emergency".into())
        .spawn(move || {
            let mut tail = JsonLinesTail::new(emergencies_path(&dir));
            let mut open: Vec<Emergency> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let now = now_ms();
                for e in tail.poll::<Emergency>() {
                    if e.not_after_ms <= now {
                        continue;
                    }
                    tracing::warn!(
                        emergency = %e.id, patient = %e.patient, clinician = %e.clinician,
                        reason = %e.reason, "emergency access open"
                    );
                    let _ = changes.send(ConsentChange::Open(e.access()));
                    notify(&hub, &e, "emergency-access-opened", &e.id);
                    open.push(e);
                }
                open.retain(|e| {
                    if e.not_after_ms > now {
                        return true;
                    }
                    tracing::info!(emergency = %e.id, patient = %e.patient, "emergency access ended");
                    notify(&hub, e, "emergency-access-ended", &format!("{}-ended", e.id));
                    false
                });
                std::thread::sleep(Duration::from_millis(200));
            }
        })
}

fn notify(hub: &AlertHub, e: &Emergency, kind: &str, id: &str) {
    let json = serde_json::json!({
        "kind": kind,
        "emergency": e.id,
        "patient": e.patient,
        "clinician": e.clinician,
        "reason": e.reason,
        "opened_ms": e.opened_ms,
        "not_after_ms": e.not_after_ms,
    });
    hub.notify(
        &e.patient,
        id,
        serde_json::to_vec(&json).unwrap_or_default(),
        wardflow_model::now_ns(),
    );
}

/// A patient's MQTT password, signed with their key: good for five minutes.
pub fn login_password(key: &Keypair, patient: &str) -> String {
    login_password_at(key, patient, now_ms())
}

fn login_password_at(key: &Keypair, patient: &str, ms: u64) -> String {
    let sig = key.sign(format!("wardflow-login:{patient}:{ms}").as_bytes());
    format!("{ms}:{}", hex(&sig.0))
}

/// Checks a patient's password against the account registered for them.
pub fn check_login(ledger_dir: &Path, patient: &str, password: &[u8]) -> bool {
    let Ok(password) = std::str::from_utf8(password) else {
        return false;
    };
    let Some((ms, sig)) = password.split_once(':') else {
        return false;
    };
    let (Ok(ms), Some(sig)) = (ms.parse::<u64>(), unhex(sig)) else {
        return false;
    };
    if now_ms().abs_diff(ms) > LOGIN_WINDOW_MS {
        return false;
    }
    let Ok(sig): Result<[u8; 64], _> = sig.try_into() else {
        return false;
    };
    let Ok(registry) = AccountRegistry::load(ledger_dir) else {
        return false;
    };
    let Some(account) = registry
        .patient(patient)
        .and_then(unhex)
        .and_then(|a| <[u8; 32]>::try_from(a).ok())
    else {
        return false;
    };
    subxt_signer::sr25519::verify(
        &subxt_signer::sr25519::Signature(sig),
        format!("wardflow-login:{patient}:{ms}"),
        &subxt_signer::sr25519::PublicKey(account),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patient_signs_in_with_their_own_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let bob = load_signer("//Bob").unwrap();
        let eve = load_signer("//Eve").unwrap();
        AccountRegistry::register(dir.path(), "patient:p-1", &bob.public_key().0).unwrap();
        let good = login_password(&bob, "p-1");
        assert!(check_login(dir.path(), "p-1", good.as_bytes()));
        assert!(
            !check_login(dir.path(), "p-2", good.as_bytes()),
            "another patient"
        );
        assert!(!check_login(
            dir.path(),
            "p-1",
            login_password(&eve, "p-1").as_bytes()
        ));
        let stale = login_password_at(&bob, "p-1", now_ms() - LOGIN_WINDOW_MS - 1000);
        assert!(!check_login(dir.path(), "p-1", stale.as_bytes()));
        assert!(!check_login(dir.path(), "p-1", b"not a statement"));
    }
}
