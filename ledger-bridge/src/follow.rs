//! Following the chain's finalized blocks for consent records.
//!
//! A thread polls the chain's finalized head and reads every block from
//! where it left off, in order. In each block it takes the signed
//! `System.remark` and `System.remark_with_event` extrinsics that succeeded
//! and whose remark starts with [`CONSENT_PREFIX`] (records inside a
//! `utility.batch` are not read: a patient's tool submits one record per
//! extrinsic), with the block's timestamp (its `Timestamp.set`). Each is
//! appended to `consent-chain.jsonl` in the ledger directory, fsynced, then
//! decided by the [`ConsentBook`] and reported; the last block read is
//! kept in `consent-cursor`. After a restart the book is rebuilt from that
//! file and reading resumes after the cursor, so a record is decided once
//! (one read again after a crash before the cursor moved is refused as
//! already recorded).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::anchor::{AnchorError, io_err};
use crate::chain::{ChainClient, connect_with_rpc};
use crate::consent::{AccountRegistry, CONSENT_PREFIX, ConsentBook, ConsentRecord, Decision, Seen};
use crate::hex;
use subxt::rpcs::{RpcClient, rpc_params};

/// The consent records read from the chain, in the ledger directory.
pub fn seen_log_path(dir: &Path) -> PathBuf {
    dir.join("consent-chain.jsonl")
}

/// Consent records signed by patients in local mode (no chain), in the
/// ledger directory: the same records, with the patient's signature over
/// the remark in place of the chain's.
pub fn local_log_path(dir: &Path) -> PathBuf {
    dir.join("consent-local.jsonl")
}

/// A consent record in local mode.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LocalRecord {
    /// The signer's account, hex.
    pub signer: String,
    /// The remark, hex.
    pub payload: String,
    /// sr25519 signature of the remark, hex.
    pub signature: String,
    /// When it was signed, Unix milliseconds.
    pub at_ms: u64,
}

impl LocalRecord {
    /// Signs `payload` with `key`.
    pub fn sign(key: &crate::chain::Keypair, payload: &[u8]) -> LocalRecord {
        LocalRecord {
            signer: hex(&key.public_key().0),
            payload: hex(payload),
            signature: hex(&key.sign(payload).0),
            at_ms: crate::now_ms(),
        }
    }

    /// The record as a local "block" `n` holds it, if its signature holds.
    fn verified(&self, n: u64) -> Result<Seen, String> {
        let signer: [u8; 32] = crate::consent::unhex(&self.signer)
            .and_then(|b| b.try_into().ok())
            .ok_or("the signer is not a 32-byte account")?;
        let signature: [u8; 64] = crate::consent::unhex(&self.signature)
            .and_then(|b| b.try_into().ok())
            .ok_or("the signature is not 64 bytes")?;
        let payload = crate::consent::unhex(&self.payload).ok_or("the payload is not hex")?;
        if !subxt_signer::sr25519::verify(
            &subxt_signer::sr25519::Signature(signature),
            &payload,
            &subxt_signer::sr25519::PublicKey(signer),
        ) {
            return Err("the signature does not match the signer".into());
        }
        Ok(Seen {
            block: n,
            block_hash: "local".into(),
            extrinsic: 0,
            block_ms: self.at_ms,
            signer: self.signer.clone(),
            payload: self.payload.clone(),
        })
    }
}

fn cursor_path(dir: &Path) -> PathBuf {
    dir.join("consent-cursor")
}

/// What the follower reports.
#[derive(Debug, Clone)]
pub enum ConsentEvent {
    /// At start, once: the accesses in force, from the records read before.
    InForce(Vec<crate::consent::Access>),
    /// A record just read from a finalized block, and what it did.
    Decided(Box<Decided>),
}

/// A record read from a finalized block, and what it did.
#[derive(Debug, Clone)]
pub struct Decided {
    pub seen: Seen,
    /// None if it does not decode.
    pub record: Option<ConsentRecord>,
    pub decision: Decision,
}

/// What the follower shows (read by the engine's metrics).
#[derive(Debug, Default)]
pub struct FollowStatus {
    pub last_block: AtomicU64,
    pub records: AtomicU64,
    pub refused: AtomicU64,
    pub errors: AtomicU64,
    pub connected: AtomicBool,
}

/// Rebuilds the book from the records read before.
pub fn load_book(dir: &Path) -> Result<(ConsentBook, Vec<Seen>), AnchorError> {
    let seen: Vec<Seen> = crate::anchor::read_json_lines(&seen_log_path(dir))?;
    let registry = AccountRegistry::load(dir)?;
    let mut book = ConsentBook::default();
    for s in &seen {
        book.apply(s, &registry);
    }
    Ok((book, seen))
}

/// Follows the chain at `url` for consent records on a thread of its own,
/// from block `from_block` on the first start. `report` gets every event.
pub struct ConsentFollower {
    join: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pub status: Arc<FollowStatus>,
}

impl ConsentFollower {
    pub fn start(
        url: String,
        dir: &Path,
        from_block: u64,
        poll: Duration,
        mut report: impl FnMut(ConsentEvent) + Send + 'static,
    ) -> Result<ConsentFollower, AnchorError> {
        let (book, seen) = load_book(dir)?;
        let cursor = match std::fs::read_to_string(cursor_path(dir)) {
            Ok(s) => s.trim().parse::<u64>().ok(),
            Err(_) => None,
        };
        let next = cursor
            .max(seen.last().map(|s| s.block))
            .map_or(from_block, |b| b + 1);
        report(ConsentEvent::InForce(book.in_force(crate::now_ms())));
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(FollowStatus::default());
        let mut f = Follower {
            url,
            dir: dir.to_path_buf(),
            book,
            next,
            status: status.clone(),
            stop: stop.clone(),
            poll,
        };
        let join = std::thread::Builder::new()
            .name("consent".into())
            .spawn(move || f.run(&mut report))
            .map_err(io_err(dir))?;
        Ok(ConsentFollower {
            join: Some(join),
            stop,
            status,
        })
    }

    /// Follows the local consent log instead of a chain (local mode): a
    /// record's "block" is its line number in the log, its time the
    /// patient's signing time, and its signature is checked against its
    /// signer before the book sees it.
    pub fn start_local(
        dir: &Path,
        poll: Duration,
        mut report: impl FnMut(ConsentEvent) + Send + 'static,
    ) -> Result<ConsentFollower, AnchorError> {
        let (book, seen) = load_book(dir)?;
        let done = seen.last().map_or(0, |s| s.block);
        report(ConsentEvent::InForce(book.in_force(crate::now_ms())));
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(FollowStatus::default());
        status.connected.store(true, Ordering::Relaxed);
        let mut f = Follower {
            url: String::new(),
            dir: dir.to_path_buf(),
            book,
            next: done + 1,
            status: status.clone(),
            stop: stop.clone(),
            poll,
        };
        let join = std::thread::Builder::new()
            .name("consent".into())
            .spawn(move || {
                let mut tail = crate::anchor::JsonLinesTail::new(local_log_path(&f.dir));
                let mut line = 0u64;
                // Records read but not yet decided (a failed decision is
                // tried again at the next poll, never dropped).
                let mut found = Vec::new();
                while !f.stop.load(Ordering::Relaxed) {
                    for r in tail.poll::<LocalRecord>() {
                        line += 1;
                        if line < f.next {
                            continue;
                        }
                        match r.verified(line) {
                            Ok(seen) => found.push(seen),
                            Err(why) => {
                                f.status.refused.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(line, signer = %r.signer, "local consent record refused: {why}");
                            }
                        }
                        f.next = line + 1;
                    }
                    match f.decide(std::mem::take(&mut found), &mut report) {
                        Ok(()) => f.status.last_block.store(line, Ordering::Relaxed),
                        Err((e, undecided)) => {
                            found = undecided;
                            f.status.errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("consent: {e}; retrying");
                        }
                    }
                    f.sleep(f.poll);
                }
            })
            .map_err(io_err(dir))?;
        Ok(ConsentFollower {
            join: Some(join),
            stop,
            status,
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for ConsentFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `f` until it completes or `stop` is set (checked every 50 ms). A
/// node that hangs (a stopped process keeps its socket open) would
/// otherwise hold the engine's shutdown for a request's whole timeout.
/// Dropping `f` at an await is like a crash there, which the record file
/// and the cursor are written to survive.
fn until_stopped<T>(
    rt: &tokio::runtime::Runtime,
    stop: &AtomicBool,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    rt.block_on(async {
        tokio::pin!(f);
        loop {
            tokio::select! {
                r = &mut f => return Some(r),
                () = tokio::time::sleep(Duration::from_millis(50)) => {
                    if stop.load(Ordering::Relaxed) {
                        return None;
                    }
                }
            }
        }
    })
}

struct Follower {
    url: String,
    dir: PathBuf,
    book: ConsentBook,
    next: u64,
    status: Arc<FollowStatus>,
    stop: Arc<AtomicBool>,
    poll: Duration,
}

impl Follower {
    fn run(&mut self, report: &mut dyn FnMut(ConsentEvent)) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("consent: cannot start: {e}");
                return;
            }
        };
        let mut client: Option<(ChainClient, RpcClient)> = None;
        let mut backoff = self.poll;
        let stop = self.stop.clone();
        while !self.stop.load(Ordering::Relaxed) {
            let api = match &client {
                Some(c) => c.clone(),
                None => match until_stopped(&rt, &stop, connect_with_rpc(&self.url)) {
                    None => break,
                    Some(Ok(c)) => {
                        self.status.connected.store(true, Ordering::Relaxed);
                        client = Some(c.clone());
                        c
                    }
                    Some(Err(e)) => {
                        self.fail(&mut backoff, e);
                        continue;
                    }
                },
            };
            match until_stopped(&rt, &stop, self.catch_up(&api.0, &api.1, report)) {
                None => break,
                Some(Ok(())) => {
                    backoff = self.poll;
                    self.sleep(self.poll);
                }
                Some(Err(e)) => {
                    client = None;
                    self.status.connected.store(false, Ordering::Relaxed);
                    self.fail(&mut backoff, e);
                }
            }
        }
    }

    fn sleep(&self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end && !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(d));
        }
    }

    fn fail(&self, backoff: &mut Duration, why: String) {
        self.status.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(url = %self.url, "consent: following the chain: {why}; retrying in {backoff:?}");
        self.sleep(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(10));
    }

    /// Reads every finalized block from `next` to the finalized head.
    ///
    /// A block is read raw first (`chain_getBlock`) and decoded with the
    /// runtime's metadata only when one of its extrinsics holds the record
    /// prefix: decoding needs the runtime version at that block, which a
    /// node computes by executing the runtime, and most blocks hold no
    /// consent record.
    async fn catch_up(
        &mut self,
        api: &ChainClient,
        rpc: &RpcClient,
        report: &mut dyn FnMut(ConsentEvent),
    ) -> Result<(), String> {
        let head = finalized_number(rpc).await?;
        let marker = hex(CONSENT_PREFIX);
        while self.next <= head && !self.stop.load(Ordering::Relaxed) {
            let n = self.next;
            let block: serde_json::Value = async {
                let hash: Option<String> =
                    rpc.request("chain_getBlockHash", rpc_params![n]).await?;
                rpc.request("chain_getBlock", rpc_params![hash]).await
            }
            .await
            .map_err(|e| format!("block #{n}: {e}"))?;
            let candidate = block["block"]["extrinsics"].as_array().is_some_and(|xs| {
                xs.iter()
                    .any(|x| x.as_str().is_some_and(|x| x.contains(&marker)))
            });
            let found = if candidate {
                records_in_block(api, n).await?
            } else {
                Vec::new()
            };
            self.decide(found, report).map_err(|(e, _)| e)?;
            let cursor = cursor_path(&self.dir);
            std::fs::write(&cursor, format!("{n}\n"))
                .map_err(|e| format!("{}: {e}", cursor.display()))?;
            self.status.last_block.store(n, Ordering::Relaxed);
            self.next = n + 1;
        }
        Ok(())
    }
}

impl Follower {
    /// Keeps the records found (fsynced), then decides and reports each.
    /// On failure nothing was decided, and the records come back with the
    /// error.
    fn decide(
        &mut self,
        found: Vec<Seen>,
        report: &mut dyn FnMut(ConsentEvent),
    ) -> Result<(), (String, Vec<Seen>)> {
        if found.is_empty() {
            return Ok(());
        }
        let registry = match AccountRegistry::load(&self.dir) {
            Ok(r) => r,
            Err(e) => return Err((e.to_string(), found)),
        };
        let path = seen_log_path(&self.dir);
        if let Err(e) = crate::anchor::append_json_lines(&path, &found) {
            return Err((e.to_string(), found));
        }
        for seen in found {
            let record = crate::consent::unhex(&seen.payload)
                .and_then(|p| ConsentRecord::decode(&p))
                .and_then(Result::ok);
            let decision = self.book.apply(&seen, &registry);
            self.status.records.fetch_add(1, Ordering::Relaxed);
            match &decision {
                Decision::Refused { reason } => {
                    self.status.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        block = seen.block,
                        extrinsic = seen.extrinsic,
                        signer = %seen.signer,
                        "consent record refused: {reason}"
                    );
                }
                d => tracing::info!(block = seen.block, "consent record: {d:?}"),
            }
            report(ConsentEvent::Decided(Box::new(Decided {
                seen,
                record,
                decision,
            })));
        }
        Ok(())
    }
}

/// The number of the chain's finalized head.
async fn finalized_number(rpc: &RpcClient) -> Result<u64, String> {
    let read = async {
        let hash: String = rpc.request("chain_getFinalizedHead", rpc_params![]).await?;
        rpc.request::<serde_json::Value>("chain_getHeader", rpc_params![hash])
            .await
    };
    let header = read
        .await
        .map_err(|e| format!("reading the finalized head: {e}"))?;
    header["number"]
        .as_str()
        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        .ok_or_else(|| format!("a header without a number: {header}"))
}

/// The consent records of finalized block `number`.
pub async fn records_in_block(api: &ChainClient, number: u64) -> Result<Vec<Seen>, String> {
    let at = api
        .at_block(number)
        .await
        .map_err(|e| format!("block #{number}: {e}"))?;
    let block_hash = format!("0x{}", hex(at.block_hash().as_ref()));
    let extrinsics = at
        .extrinsics()
        .fetch()
        .await
        .map_err(|e| format!("extrinsics of block #{number}: {e}"))?;
    let mut block_ms = 0;
    let mut found = Vec::new();
    for ext in extrinsics.iter() {
        let Ok(ext) = ext else { continue };
        let field = ext.iter_call_data_fields().next();
        match (ext.pallet_name(), ext.call_name()) {
            ("Timestamp", "set") => {
                if let Some(Ok(ms)) = field.map(|f| f.decode_as::<u64>()) {
                    block_ms = ms;
                }
            }
            ("System", "remark" | "remark_with_event") => {
                let Some(Ok(remark)) = field.map(|f| f.decode_as::<Vec<u8>>()) else {
                    continue;
                };
                if !remark.starts_with(CONSENT_PREFIX) {
                    continue;
                }
                // MultiAddress::Id: variant 0, then the 32-byte account.
                let signer = match ext.address_bytes() {
                    Some([0, rest @ ..]) if rest.len() == 32 => hex(rest),
                    Some(other) => hex(other),
                    None => String::new(),
                };
                let succeeded = ext
                    .events()
                    .await
                    .map_err(|e| format!("events of block #{number}: {e}"))?
                    .iter()
                    .filter_map(Result::ok)
                    .any(|e| e.pallet_name() == "System" && e.event_name() == "ExtrinsicSuccess");
                if succeeded {
                    found.push(Seen {
                        block: number,
                        block_hash: block_hash.clone(),
                        extrinsic: ext.index() as u32,
                        block_ms,
                        signer,
                        payload: hex(&remark),
                    });
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that takes the connection and never answers (a stopped
    /// process) does not hold up a stop: the handshake would wait for its
    /// 10 s timeout, a request for 60 s.
    #[test]
    fn a_hung_node_does_not_hold_up_a_stop() {
        // Never accepted: the kernel completes the TCP handshake, and the
        // WebSocket handshake gets no answer.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let f =
            ConsentFollower::start(url, dir.path(), 0, Duration::from_millis(100), |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(!f.status.connected.load(Ordering::Relaxed));
        let t = std::time::Instant::now();
        f.stop();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the stop took {:?}",
            t.elapsed()
        );
        drop(listener);
    }
}
