//! Patient consent, recorded on the chain by the patient.
//!
//! A consent record is a `system.remark` (or `remark_with_event`) whose
//! signer is the patient's own account, the way RMRK's protocols carry
//! their records in remarks on any Substrate chain without a pallet of
//! their own. Its payload is `"WFC1"` followed by one JSON object:
//!
//! ```text
//! {"op":"grant","patient":"p-17","grantee":"dr-okafor","purpose":"treatment",
//!  "scope":["alerts"],"not_after_ms":1790000000000,"may_delegate":false,"nonce":7}
//! {"op":"revoke","patient":"p-17","grant":"<grant id>"}
//! {"op":"delegate","parent":"<grant id>","terms":{ …the fields of a grant… }}
//! ```
//!
//! - **purpose**: `treatment`, `emergency` or `research:<study id>`;
//! - **scope**: data categories, [`SCOPES`] (`all` holds every other one);
//! - **grant id**: the first 16 bytes of SHA-256(signer ‖ payload), in hex,
//!   which the patient's tool knows before it submits.
//!
//! The [`ConsentBook`] applies records in the order of finalized blocks and
//! extrinsics, and decides each one: a grant must be signed by the account
//! registered for its patient ([`AccountRegistry`]); a revocation by the
//! patient or by whoever signed the grant (a delegator may take back what
//! it delegated), and it ends every delegation made from the grant too; a
//! delegation by the account registered for the parent grant's grantee,
//! from a grant that may delegate, still in force, for the same patient and
//! purpose, within its scope and no longer than it. Anything else is
//! refused with its reason, and changes nothing.
//!
//! What a decision opens or closes is an [`Access`]: the engine keeps the
//! accesses in force as a collection its dataflow joins with what it is
//! about to deliver, and each access carries the version of the consent it
//! comes from (`grant id@block`), which the audit trail records with every
//! decision made under it. This module decides; it neither talks to the
//! chain (see [`crate::follow`]) nor enforces anything.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::anchor::{AnchorError, io_err};
use crate::hex;

/// The prefix of a consent record's remark.
pub const CONSENT_PREFIX: &[u8; 4] = b"WFC1";

/// The data categories a consent may cover.
pub const SCOPES: [&str; 4] = ["all", "alerts", "vitals", "observations"];

/// What a grant allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    pub patient: String,
    /// A clinician's id (treatment, emergency) or a study's id (research).
    pub grantee: String,
    pub purpose: String,
    pub scope: Vec<String>,
    /// Unix milliseconds after which the grant no longer holds.
    pub not_after_ms: u64,
    pub may_delegate: bool,
    /// Makes two otherwise equal grants distinct records.
    pub nonce: u64,
}

/// One consent record, as the payload of a remark carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ConsentRecord {
    Grant(Terms),
    Revoke { patient: String, grant: String },
    Delegate { parent: String, terms: Terms },
}

impl ConsentRecord {
    /// The remark payload.
    pub fn payload(&self) -> Vec<u8> {
        let mut p = CONSENT_PREFIX.to_vec();
        p.extend_from_slice(&serde_json::to_vec(self).expect("a record serializes"));
        p
    }

    /// Decodes a payload; `None` if it is not a consent record at all
    /// (another remark), an error if it claims to be one and is malformed.
    pub fn decode(payload: &[u8]) -> Option<Result<ConsentRecord, String>> {
        let body = payload.strip_prefix(CONSENT_PREFIX.as_slice())?;
        Some(serde_json::from_slice(body).map_err(|e| format!("malformed consent record: {e}")))
    }

    pub fn patient(&self) -> &str {
        match self {
            ConsentRecord::Grant(t) | ConsentRecord::Delegate { terms: t, .. } => &t.patient,
            ConsentRecord::Revoke { patient, .. } => patient,
        }
    }
}

/// The id of the grant a record signed by `signer` creates.
pub fn grant_id(signer: &[u8; 32], payload: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(signer);
    ctx.update(payload);
    hex(&ctx.finish().as_ref()[..16])
}

/// Checks a purpose and a scope.
pub fn check_terms(t: &Terms) -> Result<(), String> {
    let purpose_ok = t.purpose == "treatment"
        || t.purpose == "emergency"
        || t.purpose
            .strip_prefix("research:")
            .is_some_and(|s| !s.is_empty());
    if !purpose_ok {
        return Err(format!(
            "purpose {:?} is not treatment, emergency or research:<study>",
            t.purpose
        ));
    }
    if t.scope.is_empty() {
        return Err("the scope is empty".into());
    }
    if let Some(s) = t.scope.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return Err(format!("scope {s:?} is not one of {}", SCOPES.join(", ")));
    }
    if t.patient.is_empty() || t.grantee.is_empty() {
        return Err("the patient and the grantee must be named".into());
    }
    Ok(())
}

/// Whether `scope` covers the category `what`.
pub fn covers(scope: &[String], what: &str) -> bool {
    scope.iter().any(|s| s == "all" || s == what)
}

/// Whether every category of `inner` is within `outer`.
fn within(inner: &[String], outer: &[String]) -> bool {
    inner.iter().all(|s| covers(outer, s))
}

/// A consent record as a finalized block holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub block: u64,
    pub block_hash: String,
    pub extrinsic: u32,
    /// The block's timestamp (`Timestamp.set`), Unix milliseconds.
    pub block_ms: u64,
    /// The extrinsic's signer, hex.
    pub signer: String,
    /// The remark, hex.
    pub payload: String,
}

/// An access in force: who may receive which of a patient's data, for
/// what, until when, and under which consent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Access {
    pub patient: String,
    pub grantee: String,
    pub purpose: String,
    pub scope: Vec<String>,
    pub not_after_ms: u64,
    /// `grant id@block`: the consent version decisions under it record.
    pub version: String,
}

/// What a record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A grant or delegation, now in force.
    Opened { id: String, access: Access },
    /// A revocation: the accesses it ended (the grant and its delegations
    /// that were still in force).
    Closed { id: String, ended: Vec<Access> },
    /// Refused, with the reason; nothing changed.
    Refused { reason: String },
}

/// Accounts registered for patients and clinicians (sr25519 public keys),
/// `ledger/accounts.json`: the hospital records a patient's account when
/// the patient presents it, as it records an address.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccountRegistry {
    /// `patient:<id>` or `clinician:<id>` to the account, hex.
    pub accounts: BTreeMap<String, String>,
}

impl AccountRegistry {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("accounts.json")
    }

    /// The registry in the ledger directory `dir` (empty if there is none).
    pub fn load(dir: &Path) -> Result<AccountRegistry, AnchorError> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AnchorError::Key {
                path: path.clone(),
                what: format!("not an account registry: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Registers `account` for `subject` (`patient:<id>`, `clinician:<id>`),
    /// replacing the file atomically.
    pub fn register(dir: &Path, subject: &str, account: &[u8; 32]) -> Result<(), AnchorError> {
        let mut r = Self::load(dir)?;
        r.accounts.insert(subject.to_string(), hex(account));
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = Self::path(dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&r).expect("serializes"))
            .map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    pub fn patient(&self, id: &str) -> Option<&str> {
        self.accounts
            .get(&format!("patient:{id}"))
            .map(String::as_str)
    }

    pub fn clinician(&self, id: &str) -> Option<&str> {
        self.accounts
            .get(&format!("clinician:{id}"))
            .map(String::as_str)
    }
}

/// A grant the book holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub id: String,
    pub terms: Terms,
    pub parent: Option<String>,
    pub signer: String,
    pub block: u64,
    pub block_ms: u64,
    /// The block of the revocation that ended it.
    pub revoked_at: Option<u64>,
}

impl Grant {
    pub fn access(&self) -> Access {
        Access {
            patient: self.terms.patient.clone(),
            grantee: self.terms.grantee.clone(),
            purpose: self.terms.purpose.clone(),
            scope: self.terms.scope.clone(),
            not_after_ms: self.terms.not_after_ms,
            version: format!("{}@{}", self.id, self.block),
        }
    }

    /// In force at `ms`.
    pub fn holds_at(&self, ms: u64) -> bool {
        self.revoked_at.is_none() && ms < self.terms.not_after_ms
    }
}

/// Every grant seen, in the order of the chain.
#[derive(Debug, Default)]
pub struct ConsentBook {
    grants: HashMap<String, Grant>,
    order: Vec<String>,
}

impl ConsentBook {
    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.order.iter().filter_map(|id| self.grants.get(id))
    }

    pub fn get(&self, id: &str) -> Option<&Grant> {
        self.grants.get(id)
    }

    /// The accesses in force at `ms`.
    pub fn in_force(&self, ms: u64) -> Vec<Access> {
        self.grants()
            .filter(|g| g.holds_at(ms))
            .map(Grant::access)
            .collect()
    }

    /// Applies one record found on the chain.
    pub fn apply(&mut self, seen: &Seen, registry: &AccountRegistry) -> Decision {
        match self.decide(seen, registry) {
            Ok(d) => d,
            Err(reason) => Decision::Refused { reason },
        }
    }

    fn decide(&mut self, seen: &Seen, registry: &AccountRegistry) -> Result<Decision, String> {
        let payload = unhex(&seen.payload).ok_or("the payload is not hex")?;
        let signer: [u8; 32] = unhex(&seen.signer)
            .and_then(|s| s.try_into().ok())
            .ok_or("the signer is not a 32-byte account")?;
        let record = ConsentRecord::decode(&payload).ok_or("not a consent record")??;
        let id = grant_id(&signer, &payload);
        if self.grants.contains_key(&id) {
            return Err(format!("grant {id} is already recorded"));
        }
        let signer_hex = hex(&signer);
        let patient_account = registry.patient(record.patient());
        match record {
            ConsentRecord::Grant(terms) => {
                check_terms(&terms)?;
                if patient_account != Some(signer_hex.as_str()) {
                    return Err(format!(
                        "signed by {signer_hex}, which is not the account registered for patient {}",
                        terms.patient
                    ));
                }
                if terms.not_after_ms <= seen.block_ms {
                    return Err(format!(
                        "it expired ({} ms) before its block ({} ms)",
                        terms.not_after_ms, seen.block_ms
                    ));
                }
                Ok(self.open(id, terms, None, signer_hex, seen))
            }
            ConsentRecord::Delegate { parent, terms } => {
                check_terms(&terms)?;
                let p = self
                    .grants
                    .get(&parent)
                    .ok_or_else(|| format!("delegation from unknown grant {parent}"))?;
                let delegator = registry
                    .clinician(&p.terms.grantee)
                    .unwrap_or(&p.terms.grantee);
                if delegator != signer_hex {
                    return Err(format!(
                        "delegation of grant {parent} signed by {signer_hex}, not by its grantee {}",
                        p.terms.grantee
                    ));
                }
                let beyond = if !p.holds_at(seen.block_ms) {
                    Some("the grant is no longer in force".to_string())
                } else if !p.terms.may_delegate {
                    Some("the grant may not be delegated".into())
                } else if terms.patient != p.terms.patient || terms.purpose != p.terms.purpose {
                    Some("another patient or purpose".into())
                } else if !within(&terms.scope, &p.terms.scope) {
                    Some(format!(
                        "scope {:?} is wider than the grant's {:?}",
                        terms.scope, p.terms.scope
                    ))
                } else if terms.not_after_ms > p.terms.not_after_ms {
                    Some("it outlasts the grant".into())
                } else {
                    None
                };
                if let Some(why) = beyond {
                    return Err(format!(
                        "delegation beyond the delegator's grant {parent}: {why}"
                    ));
                }
                Ok(self.open(id, terms, Some(parent), signer_hex, seen))
            }
            ConsentRecord::Revoke { patient, grant } => {
                let g = self
                    .grants
                    .get(&grant)
                    .ok_or_else(|| format!("revocation of unknown grant {grant}"))?;
                if g.terms.patient != patient {
                    return Err(format!("grant {grant} is not patient {patient}'s"));
                }
                if patient_account != Some(signer_hex.as_str()) && g.signer != signer_hex {
                    return Err(format!(
                        "revocation of grant {grant} signed by {signer_hex}, neither the patient nor the grant's signer"
                    ));
                }
                if g.revoked_at.is_some() {
                    return Err(format!("grant {grant} is already revoked"));
                }
                let mut ended = Vec::new();
                let mut todo = vec![grant.clone()];
                while let Some(gid) = todo.pop() {
                    todo.extend(
                        self.grants
                            .values()
                            .filter(|c| c.parent.as_deref() == Some(gid.as_str()))
                            .map(|c| c.id.clone()),
                    );
                    if let Some(g) = self.grants.get_mut(&gid)
                        && g.revoked_at.is_none()
                    {
                        if g.terms.not_after_ms > seen.block_ms {
                            ended.push(g.access());
                        }
                        g.revoked_at = Some(seen.block);
                    }
                }
                Ok(Decision::Closed { id: grant, ended })
            }
        }
    }

    fn open(
        &mut self,
        id: String,
        terms: Terms,
        parent: Option<String>,
        signer: String,
        seen: &Seen,
    ) -> Decision {
        let g = Grant {
            id: id.clone(),
            terms,
            parent,
            signer,
            block: seen.block,
            block_ms: seen.block_ms,
            revoked_at: None,
        };
        let access = g.access();
        self.grants.insert(id.clone(), g);
        self.order.push(id.clone());
        Decision::Opened { id, access }
    }
}

/// Decodes lower-case or upper-case hex, with or without `0x`.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENT: [u8; 32] = [1; 32];
    const DOCTOR: [u8; 32] = [2; 32];
    const STRANGER: [u8; 32] = [3; 32];
    const NURSE: [u8; 32] = [4; 32];

    fn registry() -> AccountRegistry {
        let mut r = AccountRegistry::default();
        r.accounts.insert("patient:p1".into(), hex(&PATIENT));
        r.accounts.insert("clinician:dr-b".into(), hex(&DOCTOR));
        r.accounts.insert("clinician:dr-c".into(), hex(&NURSE));
        r
    }

    fn terms(grantee: &str, scope: &[&str], not_after_ms: u64, may_delegate: bool) -> Terms {
        Terms {
            patient: "p1".into(),
            grantee: grantee.into(),
            purpose: "treatment".into(),
            scope: scope.iter().map(|s| s.to_string()).collect(),
            not_after_ms,
            may_delegate,
            nonce: 0,
        }
    }

    fn seen(block: u64, signer: [u8; 32], r: &ConsentRecord) -> Seen {
        Seen {
            block,
            block_hash: format!("0x{block:064x}"),
            extrinsic: 1,
            block_ms: block * 1000,
            signer: hex(&signer),
            payload: hex(&r.payload()),
        }
    }

    fn open(book: &mut ConsentBook, block: u64, signer: [u8; 32], r: &ConsentRecord) -> String {
        match book.apply(&seen(block, signer, r), &registry()) {
            Decision::Opened { id, .. } => id,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    fn refused(book: &mut ConsentBook, block: u64, signer: [u8; 32], r: &ConsentRecord) -> String {
        match book.apply(&seen(block, signer, r), &registry()) {
            Decision::Refused { reason } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn records_round_trip_and_other_remarks_are_not_records() {
        let r = ConsentRecord::Grant(terms("dr-b", &["alerts"], 10, false));
        assert_eq!(ConsentRecord::decode(&r.payload()).unwrap().unwrap(), r);
        assert!(ConsentRecord::decode(b"WFA1 an anchor").is_none());
        assert!(ConsentRecord::decode(b"WFC1{not json").unwrap().is_err());
    }

    #[test]
    fn only_the_patient_grants_and_the_grant_ends_when_it_says() {
        let mut book = ConsentBook::default();
        let g = ConsentRecord::Grant(terms("dr-b", &["alerts"], 50_000, false));
        let why = refused(&mut book, 2, STRANGER, &g);
        assert!(
            why.contains("not the account registered for patient p1"),
            "{why}"
        );
        assert!(book.in_force(3_000).is_empty());
        let id = open(&mut book, 3, PATIENT, &g);
        assert_eq!(book.in_force(4_000)[0].version, format!("{id}@3"));
        assert!(book.in_force(50_000).is_empty(), "expired at not_after");
        // A grant that expired before its block is refused.
        let old = ConsentRecord::Grant(terms("dr-b", &["alerts"], 1_000, false));
        assert!(refused(&mut book, 5, PATIENT, &old).contains("expired"));
        // Bad terms.
        let mut bad = terms("dr-b", &["genome"], 90_000, false);
        assert!(
            refused(&mut book, 6, PATIENT, &ConsentRecord::Grant(bad.clone())).contains("scope")
        );
        bad.scope = vec!["all".into()];
        bad.purpose = "marketing".into();
        assert!(refused(&mut book, 7, PATIENT, &ConsentRecord::Grant(bad)).contains("purpose"));
    }

    #[test]
    fn delegation_stays_within_the_grant_and_revocation_ends_both() {
        let mut book = ConsentBook::default();
        let parent = open(
            &mut book,
            2,
            PATIENT,
            &ConsentRecord::Grant(terms("dr-b", &["alerts", "vitals"], 90_000, true)),
        );
        let delegate = |scope: &[&str], until: u64| ConsentRecord::Delegate {
            parent: parent.clone(),
            terms: terms("dr-c", scope, until, false),
        };
        // Wider scope, longer life, wrong signer: refused.
        let why = refused(&mut book, 3, DOCTOR, &delegate(&["all"], 80_000));
        assert!(
            why.contains("beyond the delegator's grant") && why.contains("wider"),
            "{why}"
        );
        assert!(refused(&mut book, 4, DOCTOR, &delegate(&["alerts"], 95_000)).contains("outlasts"));
        assert!(
            refused(&mut book, 5, STRANGER, &delegate(&["alerts"], 80_000))
                .contains("not by its grantee")
        );
        let child = open(&mut book, 6, DOCTOR, &delegate(&["alerts"], 80_000));
        assert_eq!(book.in_force(7_000).len(), 2);
        // The delegate may not delegate further.
        let further = ConsentRecord::Delegate {
            parent: child.clone(),
            terms: terms("dr-d", &["alerts"], 70_000, false),
        };
        assert!(refused(&mut book, 7, NURSE, &further).contains("may not be delegated"));
        // A stranger may not revoke; the patient may, and that ends both.
        let revoke = ConsentRecord::Revoke {
            patient: "p1".into(),
            grant: parent.clone(),
        };
        assert!(refused(&mut book, 8, STRANGER, &revoke).contains("neither the patient"));
        match book.apply(&seen(9, PATIENT, &revoke), &registry()) {
            Decision::Closed { id, ended } => {
                assert_eq!(id, parent);
                let mut who: Vec<_> = ended.iter().map(|a| a.grantee.as_str()).collect();
                who.sort();
                assert_eq!(who, ["dr-b", "dr-c"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(book.in_force(10_000).is_empty());
        assert!(refused(&mut book, 10, PATIENT, &revoke).contains("already revoked"));
    }
}
