// SPDX-License-Identifier: Apache-2.0
//! The pre-copy sender: copies guest memory while the guest runs, then
//! pauses it, sends the last dirty pages and the device state, waits for the
//! receiver's `Ready`, and commits with `Go`. Until `Go` is sent the source
//! stays authoritative: every failure resumes it. After `Go`, an `Error` from
//! the receiver still resumes it; silence (a broken link) leaves it paused,
//! since the receiver may be running the guest ([`MigrationError::InDoubt`]).

use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::auth::{self, Token};
use super::config::MigrationConfig;
use super::protocol::{
    self, FrameBuf, Hello, Message, ProtocolError, MAX_PAGES_PER_FRAME, MAX_STATE_CHUNK, PAGE_SIZE,
};
use super::status::{MigrationState, MigrationStatus};
use super::transport::Connection;
use super::{HookError, MigrationError, Result};

/// Throttle applied when auto-converge first kicks in, percent.
const THROTTLE_START: u8 = 20;
/// Throttle increase per further non-converging iteration, percent.
const THROTTLE_STEP: u8 = 10;
/// Highest throttle, percent.
const THROTTLE_MAX: u8 = 99;
/// Iterations at the highest throttle before giving up.
const ROUNDS_AT_MAX_THROTTLE: u32 = 3;
/// Iterations without a new smallest dirty set that count as a stall.
const STALL_LIMIT: u32 = 3;
/// Data pages an iteration must send for its bandwidth to be trusted.
const MIN_PAGES_FOR_BANDWIDTH: u64 = 256;
/// How long to wait for the receiver's reason after a write failed.
const PEER_ERROR_WAIT: Duration = Duration::from_millis(500);

const MIB: f64 = (1 << 20) as f64;

/// What the sender needs from the running VM. Implemented by the VMM.
pub trait MigrationSource {
    /// The VM's configuration, checked by the receiver.
    fn config(&self) -> MigrationConfig;
    /// Guest RAM. Pages are read while the guest runs; the final pass reads
    /// them while it is paused.
    fn memory(&self) -> &GuestMemoryMmap;
    /// Starts dirty-page tracking (e.g. `persist::set_dirty_logging(.., true)`).
    fn start_dirty_tracking(&mut self) -> std::result::Result<(), HookError>;
    /// Stops dirty-page tracking after a failure.
    fn stop_dirty_tracking(&mut self) -> std::result::Result<(), HookError> {
        Ok(())
    }
    /// Pages written since the last call, one `u64` bitmap per region
    /// (`persist::dirty_bitmaps`).
    fn dirty_bitmaps(&mut self) -> std::result::Result<Vec<Vec<u64>>, HookError>;
    /// Pages that may hold data, one bitmap per region, for the first full
    /// pass; pages left out must read as zero (the receiver's memory starts
    /// zeroed), and must be asked for after dirty tracking started. `None`
    /// (the default) sends every page.
    fn initial_pages(&mut self) -> Option<Vec<Vec<u64>>> {
        None
    }
    /// Pauses all vCPUs and devices and returns the opaque state blob (the
    /// same postcard state the snapshot uses).
    fn pause_and_save(&mut self) -> std::result::Result<Vec<u8>, HookError>;
    /// Makes sure the VM runs again. Called on every failure once migration
    /// has started, whether or not the VM was paused, so it must be a no-op
    /// on a running VM.
    fn resume(&mut self) -> std::result::Result<(), HookError>;
    /// Limits vCPU run time to `100 - percent` percent (auto-converge); 0
    /// lifts the limit.
    fn throttle(&mut self, _percent: u8) {}
}

/// Sender tuning.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Longest acceptable pause: pre-copy stops once the dirty set would be
    /// sent within this at the measured bandwidth.
    pub max_downtime: Duration,
    /// Most pre-copy iterations after the full copy before giving up (or
    /// starting to throttle).
    pub max_iterations: u32,
    /// Throttle the guest instead of giving up when it does not converge.
    pub auto_converge: bool,
    /// How long to wait for each handshake reply.
    pub handshake_timeout: Duration,
    /// How long to wait for `Running` after `Complete`.
    pub running_timeout: Duration,
    /// Longest a single write may block.
    pub write_timeout: Duration,
    /// If set, the receiver must prove it knows this token (and this sender
    /// proves it too) before the configuration or any memory is sent.
    pub token: Option<Token>,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(300),
            max_iterations: 30,
            auto_converge: false,
            handshake_timeout: Duration::from_secs(10),
            running_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            token: None,
        }
    }
}

/// What a successful migration did.
#[derive(Debug, Clone, PartialEq)]
pub struct SendReport {
    /// Pre-copy iterations after the full copy.
    pub iterations: u32,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Pages sent (data and zero markers).
    pub pages_sent: u64,
    /// Of those, zero markers.
    pub zero_pages: u64,
    /// Pause to `Running`.
    pub downtime: Duration,
    /// Handshake to `Running`.
    pub total: Duration,
}

/// Migrates the VM behind `source` over `conn`. On success the receiver
/// runs the guest and the caller should stop the source. On failure the
/// source has been resumed (see [`MigrationSource::resume`]) and keeps
/// running; `status` says `Failed` or `Cancelled`.
pub fn send<C: Connection + ?Sized>(
    conn: &mut C,
    source: &mut dyn MigrationSource,
    opts: &SendOptions,
    status: &MigrationStatus,
) -> Result<SendReport> {
    let mut s = Sender {
        conn,
        source,
        opts,
        status,
        frame: FrameBuf::default(),
        tx: Tx::default(),
        started: Instant::now(),
        tracking: false,
        throttle: 0,
        complete_sent: false,
    };
    match s.run() {
        Ok(r) => {
            status.update(|st| st.state = MigrationState::Completed);
            Ok(r)
        }
        Err(e) => {
            let e = s.explain(e);
            s.clean_up(&e);
            let cancelled = matches!(e, MigrationError::Cancelled(_));
            status.update(|st| {
                st.state = if cancelled {
                    MigrationState::Cancelled
                } else {
                    MigrationState::Failed
                };
                st.error = Some(e.to_string());
            });
            Err(e)
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Tx {
    bytes: u64,
    pages: u64,
    zero_pages: u64,
}

struct Sender<'a, C: Connection + ?Sized> {
    conn: &'a mut C,
    source: &'a mut dyn MigrationSource,
    opts: &'a SendOptions,
    status: &'a MigrationStatus,
    frame: FrameBuf,
    tx: Tx,
    started: Instant,
    tracking: bool,
    throttle: u8,
    complete_sent: bool,
}

fn hook<T>(what: &'static str, r: std::result::Result<T, HookError>) -> Result<T> {
    r.map_err(|source| MigrationError::Source { what, source })
}

fn count_dirty(bitmaps: &[Vec<u64>], mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .zip(bitmaps)
        .map(|(r, bm)| {
            let pages = r.len() / PAGE_SIZE as u64;
            let full = (pages / 64) as usize;
            let mut n: u64 = bm.iter().take(full).map(|w| w.count_ones() as u64).sum();
            let tail = pages % 64;
            if tail != 0 {
                if let Some(w) = bm.get(full) {
                    n += (w & ((1u64 << tail) - 1)).count_ones() as u64;
                }
            }
            n
        })
        .sum()
}

fn or_into(acc: &mut Vec<Vec<u64>>, more: Vec<Vec<u64>>) {
    if acc.len() < more.len() {
        acc.resize(more.len(), Vec::new());
    }
    for (a, m) in acc.iter_mut().zip(more) {
        if a.len() < m.len() {
            a.resize(m.len(), 0);
        }
        for (x, y) in a.iter_mut().zip(m) {
            *x |= y;
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    let chunks = page.chunks_exact(16);
    let rest = chunks.remainder();
    chunks
        .map(|c| c.try_into().map_or(1, u128::from_ne_bytes))
        .all(|w| w == 0)
        && rest.iter().all(|&b| b == 0)
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB / d.as_secs_f64().max(1e-6)
}

impl<C: Connection + ?Sized> Sender<'_, C> {
    fn run(&mut self) -> Result<SendReport> {
        self.conn
            .set_write_timeout(Some(self.opts.write_timeout))
            .map_err(MigrationError::Socket)?;
        self.handshake()?;

        hook("start dirty tracking", self.source.start_dirty_tracking())?;
        self.tracking = true;
        self.status.update(|s| s.state = MigrationState::PreCopy);

        // Iteration 0: everything (that was ever touched).
        let all: Vec<Vec<u64>> = self.source.initial_pages().unwrap_or_else(|| {
            self.source
                .memory()
                .iter()
                .map(|r| vec![u64::MAX; (r.len() / PAGE_SIZE as u64).div_ceil(64) as usize])
                .collect()
        });
        let t0 = Instant::now();
        let before = self.tx;
        self.send_pages(&all)?;
        let mut bandwidth = mib_per_s(self.tx.bytes - before.bytes, t0.elapsed());
        self.status.update(|s| s.bandwidth_mib_per_s = bandwidth);

        let mut last_fetch = t0;
        let mut iteration = 0u32;
        let mut best = u64::MAX;
        let mut stalled = 0u32;
        let mut rounds_at_max = 0u32;
        let pending = loop {
            self.check_cancel()?;
            let dirty = hook("read dirty bitmaps", self.source.dirty_bitmaps())?;
            let now = Instant::now();
            let interval = now.duration_since(last_fetch);
            last_fetch = now;
            let d = count_dirty(&dirty, self.source.memory());
            let dirty_bytes = d * PAGE_SIZE as u64;
            let dirty_mib_s = mib_per_s(dirty_bytes, interval);
            let expected =
                Duration::try_from_secs_f64(dirty_bytes as f64 / MIB / bandwidth.max(1e-3))
                    .unwrap_or(Duration::MAX);
            self.status.update(|s| {
                s.iteration = iteration;
                s.dirty_pages = d;
                s.dirty_pages_per_s = d as f64 / interval.as_secs_f64().max(1e-6);
                s.dirty_mib_per_s = dirty_mib_s;
                s.expected_downtime_ms = expected.as_millis() as u64;
            });
            if expected <= self.opts.max_downtime {
                break dirty;
            }
            if d < best {
                best = d;
                stalled = 0;
            } else {
                stalled += 1;
            }
            if iteration >= self.opts.max_iterations || stalled >= STALL_LIMIT {
                let not_converged = MigrationError::NotConverged {
                    iterations: iteration,
                    dirty_mib_s,
                    bandwidth_mib_s: bandwidth,
                };
                if !self.opts.auto_converge {
                    return Err(not_converged);
                }
                if self.throttle >= THROTTLE_MAX {
                    rounds_at_max += 1;
                    if rounds_at_max > ROUNDS_AT_MAX_THROTTLE {
                        return Err(not_converged);
                    }
                } else {
                    self.throttle = if self.throttle == 0 {
                        THROTTLE_START
                    } else {
                        self.throttle
                            .saturating_add(THROTTLE_STEP)
                            .min(THROTTLE_MAX)
                    };
                    self.source.throttle(self.throttle);
                    let t = self.throttle;
                    self.status.update(|s| s.throttle_percent = t);
                }
            }
            iteration += 1;
            let t = Instant::now();
            let before = self.tx;
            self.send_pages(&dirty)?;
            let data_pages =
                (self.tx.pages - before.pages) - (self.tx.zero_pages - before.zero_pages);
            if data_pages >= MIN_PAGES_FOR_BANDWIDTH {
                bandwidth = mib_per_s(self.tx.bytes - before.bytes, t.elapsed());
                self.status.update(|s| s.bandwidth_mib_per_s = bandwidth);
            }
        };

        // Downtime: pause, save, last pages, state.
        self.check_cancel()?;
        self.status.update(|s| s.state = MigrationState::Downtime);
        let paused_at = Instant::now();
        let state = hook("pause and save the VM", self.source.pause_and_save())?;
        let mut last = pending;
        or_into(
            &mut last,
            hook("read dirty bitmaps", self.source.dirty_bitmaps())?,
        );
        self.send_pages(&last)?;
        for chunk in state.chunks(MAX_STATE_CHUNK) {
            self.check_cancel()?;
            self.send(&Message::State(chunk.to_vec()))?;
        }
        self.check_cancel()?;
        self.send(&Message::Complete)?;
        self.complete_sent = true;

        self.conn
            .set_read_timeout(Some(self.opts.running_timeout))
            .map_err(MigrationError::Socket)?;
        // Nothing runs on the receiver before `Go`: any failure until it is
        // sent leaves the guest to this side.
        self.await_reply("Ready", |m| matches!(m, Message::Ready))?;
        self.send(&Message::Go)?;
        // Past the commit point: only an explicit `Error` proves the receiver
        // does not run the guest; silence leaves the outcome in doubt.
        match self.await_reply("Running", |m| matches!(m, Message::Running)) {
            Ok(()) => {}
            Err(e @ MigrationError::Peer(_)) => return Err(e),
            Err(e) => return Err(MigrationError::InDoubt(e.to_string())),
        }
        let downtime = paused_at.elapsed();
        self.status
            .update(|s| s.downtime_ms = Some(downtime.as_millis() as u64));
        Ok(SendReport {
            iterations: iteration,
            bytes_sent: self.tx.bytes,
            pages_sent: self.tx.pages,
            zero_pages: self.tx.zero_pages,
            downtime,
            total: self.started.elapsed(),
        })
    }

    /// Reads the receiver's next message, which must satisfy `want`.
    fn await_reply(&mut self, name: &'static str, want: fn(&Message) -> bool) -> Result<()> {
        match self.reply(name, self.opts.running_timeout)? {
            m if want(&m) => Ok(()),
            m => Err(self.unexpected(name, m)),
        }
    }

    fn handshake(&mut self) -> Result<()> {
        self.conn
            .set_read_timeout(Some(self.opts.handshake_timeout))
            .map_err(MigrationError::Socket)?;
        self.send(&Message::Hello(Hello::ours()))?;
        match self.reply("Hello", self.opts.handshake_timeout)? {
            Message::Hello(h) => h.check()?,
            m => return Err(self.unexpected("Hello", m)),
        }
        self.authenticate()?;
        self.send(&Message::Config(self.source.config()))?;
        match self.reply("Accept", self.opts.handshake_timeout)? {
            Message::Accept => Ok(()),
            Message::Refuse { reason } => Err(MigrationError::Refused(reason)),
            m => Err(self.unexpected("Accept", m)),
        }
    }

    /// Answers the receiver's challenge and, with a token, checks its proof.
    fn authenticate(&mut self) -> Result<()> {
        let theirs = match self.reply("Challenge", self.opts.handshake_timeout)? {
            Message::Challenge { nonce } => nonce,
            m => return Err(self.unexpected("Challenge", m)),
        };
        let ours = auth::nonce()?;
        let token = self.opts.token.clone();
        let proof = token.as_ref().map(|t| t.sender_proof(&theirs, &ours));
        self.send(&Message::Auth { nonce: ours, proof })?;
        let proof = match self.reply("AuthOk", self.opts.handshake_timeout)? {
            Message::AuthOk { proof } => proof,
            Message::Refuse { reason } => return Err(MigrationError::Refused(reason)),
            m => return Err(self.unexpected("AuthOk", m)),
        };
        let Some(token) = token else {
            return Ok(());
        };
        match proof {
            Some(p) if token.verify_receiver(&theirs, &ours, &p) => Ok(()),
            Some(_) => Err(MigrationError::Unauthenticated(
                "the receiver's migration token does not match this sender's".into(),
            )),
            None => Err(MigrationError::Unauthenticated(
                "the receiver has no migration token (this sender requires one)".into(),
            )),
        }
    }

    /// Reads the receiver's next message; a read timeout (the socket's,
    /// `timeout`) is reported as waiting for `expected`.
    fn reply(&mut self, expected: &'static str, timeout: Duration) -> Result<Message> {
        match protocol::read_message(self.conn) {
            Ok(m) => Ok(m),
            Err(ProtocolError::Timeout) => Err(MigrationError::Timeout(timeout, expected)),
            Err(e) => Err(e.into()),
        }
    }

    fn unexpected(&self, expected: &'static str, m: Message) -> MigrationError {
        match m {
            Message::Error { message } => MigrationError::Peer(message),
            m => MigrationError::Unexpected {
                expected,
                got: m.name(),
            },
        }
    }

    fn check_cancel(&self) -> Result<()> {
        if !self.complete_sent && self.status.is_cancel_requested() {
            return Err(MigrationError::Cancelled("cancelled on the source".into()));
        }
        Ok(())
    }

    fn send(&mut self, m: &Message) -> Result<()> {
        self.frame.buf = m.encode();
        self.write_frame()
    }

    fn write_frame(&mut self) -> Result<()> {
        self.conn
            .write_all(&self.frame.buf)
            .map_err(ProtocolError::from_io)?;
        self.tx.bytes += self.frame.buf.len() as u64;
        let tx = self.tx;
        self.status.update(|s| {
            s.bytes_sent = tx.bytes;
            s.pages_sent = tx.pages;
            s.zero_pages = tx.zero_pages;
        });
        Ok(())
    }

    /// Sends every page set in `bitmaps` as runs of contiguous pages.
    fn send_pages(&mut self, bitmaps: &[Vec<u64>]) -> Result<()> {
        let regions = self.source.memory().num_regions();
        for (r, bm) in bitmaps.iter().enumerate().take(regions) {
            let len = match self.source.memory().iter().nth(r) {
                Some(region) => region.len(),
                None => break,
            };
            let pages = len / PAGE_SIZE as u64;
            let bit = |p: u64| {
                bm.get((p / 64) as usize)
                    .is_some_and(|w| w & (1 << (p % 64)) != 0)
            };
            let mut p = 0u64;
            while p < pages {
                let word = bm.get((p / 64) as usize).copied().unwrap_or(0) >> (p % 64);
                if word == 0 {
                    p = (p / 64 + 1) * 64;
                    continue;
                }
                if !bit(p) {
                    p += word.trailing_zeros() as u64;
                    continue;
                }
                let start = p;
                while p < pages && bit(p) && p - start < MAX_PAGES_PER_FRAME as u64 {
                    p += 1;
                }
                self.check_cancel()?;
                self.send_run(r as u32, start, (p - start) as u32)?;
            }
        }
        Ok(())
    }

    fn send_run(&mut self, region: u32, first_page: u64, count: u32) -> Result<()> {
        let Some(mem_region) = self.source.memory().iter().nth(region as usize) else {
            return Ok(());
        };
        let f = &mut self.frame;
        f.begin(protocol::tag::PAGES);
        f.put(&region.to_le_bytes());
        f.put(&first_page.to_le_bytes());
        f.put(&count.to_le_bytes());
        let map_at = f.buf.len();
        f.buf.resize(map_at + count.div_ceil(8) as usize, 0);
        let mut zero = 0;
        for i in 0..count {
            let at = f.buf.len();
            f.buf.resize(at + PAGE_SIZE, 0);
            let offset = (first_page + i as u64) * PAGE_SIZE as u64;
            mem_region
                .read_slice(&mut f.buf[at..], MemoryRegionAddress(offset))
                .map_err(|e| MigrationError::Memory {
                    region,
                    offset,
                    reason: e.to_string(),
                })?;
            if is_zero(&f.buf[at..]) {
                f.buf.truncate(at);
                zero += 1;
            } else {
                f.buf[map_at + (i / 8) as usize] |= 1 << (i % 8);
            }
        }
        f.finish();
        self.tx.pages += count as u64;
        self.tx.zero_pages += zero;
        self.write_frame()
    }

    /// Replaces a bare stream failure by the receiver's own reason, if it
    /// sent one before closing.
    fn explain(&mut self, e: MigrationError) -> MigrationError {
        if !matches!(
            e,
            MigrationError::Protocol(ProtocolError::Io(_) | ProtocolError::Truncated)
        ) {
            return e;
        }
        if self.conn.set_read_timeout(Some(PEER_ERROR_WAIT)).is_err() {
            return e;
        }
        // Skip at most a few replies still queued (none are expected).
        for _ in 0..4 {
            match protocol::read_message(self.conn) {
                Ok(Message::Error { message }) => return MigrationError::Peer(message),
                Ok(Message::Cancel { reason }) => return MigrationError::Cancelled(reason),
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        e
    }

    /// After a failure: tell the receiver (best effort), lift the throttle,
    /// stop tracking and resume the guest, unless the receiver may already
    /// run it ([`MigrationError::InDoubt`]): then the guest stays paused.
    fn clean_up(&mut self, e: &MigrationError) {
        let _ = self.conn.set_write_timeout(Some(PEER_ERROR_WAIT));
        let goodbye = match e {
            MigrationError::Cancelled(reason) => Some(Message::Cancel {
                reason: reason.clone(),
            }),
            MigrationError::Peer(_) | MigrationError::Refused(_) | MigrationError::InDoubt(_) => {
                None
            }
            MigrationError::Protocol(ProtocolError::Io(_) | ProtocolError::Truncated) => None,
            e => Some(Message::Error {
                message: e.to_string(),
            }),
        };
        if let Some(m) = goodbye {
            let _ = self.conn.write_all(&m.encode());
        }
        if self.throttle != 0 {
            self.source.throttle(0);
            self.throttle = 0;
            self.status.update(|s| s.throttle_percent = 0);
        }
        if self.tracking {
            if let Err(err) = self.source.stop_dirty_tracking() {
                log::warn!("migration: cannot stop dirty tracking: {err}");
            }
            self.tracking = false;
        }
        if matches!(e, MigrationError::InDoubt(_)) {
            return;
        }
        if let Err(err) = self.source.resume() {
            log::error!("migration: cannot resume the source after failure: {err}");
        }
    }
}
