// SPDX-License-Identifier: Apache-2.0
//! End-to-end tests of the sender and receiver over real guest memory and
//! real sockets, with fake VMM hooks and a thread that dirties memory.

use std::io::{self, Cursor, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{self, Hello, Message, Pages, PAGE_SIZE};
use super::*;

const MIB: usize = 1 << 20;

/// Two regions with a gap, like RAM split around the MMIO hole.
fn layout(low_mib: usize, high_mib: usize) -> Vec<(GuestAddress, usize)> {
    vec![
        (GuestAddress(0), low_mib * MIB),
        (GuestAddress(0x1_0000_0000), high_mib * MIB),
    ]
}

fn new_memory(ranges: &[(GuestAddress, usize)]) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(ranges).unwrap()
}

fn cpu() -> CpuFeatures {
    CpuFeatures {
        vendor: "GenuineIntel".into(),
        leaf1_ecx: 0x7ffa_3203,
        leaf1_edx: 0x0f8b_fbff,
        leaf7_ebx: 0x029c_6fbf,
        leaf7_ecx: 0x4,
        leaf7_edx: 0,
    }
}

fn config_of(mem: &GuestMemoryMmap, vcpus: u32) -> MigrationConfig {
    MigrationConfig {
        memory: MigrationConfig::memory_of(mem),
        vcpus,
        devices: vec![
            DeviceSummary {
                kind: "block".into(),
                id: "rootfs".into(),
            },
            DeviceSummary {
                kind: "net".into(),
                id: "eth0".into(),
            },
        ],
        cpu: cpu(),
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Writes random data to `pages` pages spread over both regions.
fn scatter(mem: &GuestMemoryMmap, pages: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut page = [0u8; PAGE_SIZE];
    let total: u64 = mem.iter().map(|r| r.len() / PAGE_SIZE as u64).sum();
    for _ in 0..pages {
        rng.fill(&mut page);
        write_page(mem, rng.next() % total, &page);
    }
}

/// Writes page `n`, counted across all regions.
fn write_page(mem: &GuestMemoryMmap, mut n: u64, data: &[u8]) {
    for r in mem.iter() {
        let pages = r.len() / PAGE_SIZE as u64;
        if n < pages {
            let addr = r.start_addr().0 + n * PAGE_SIZE as u64;
            mem.write_slice(data, GuestAddress(addr)).unwrap();
            return;
        }
        n -= pages;
    }
}

fn fill_random(mem: &GuestMemoryMmap, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; MIB];
    for r in mem.iter() {
        for off in (0..r.len()).step_by(MIB) {
            rng.fill(&mut buf);
            let n = (r.len() - off).min(MIB as u64) as usize;
            mem.write_slice(&buf[..n], GuestAddress(r.start_addr().0 + off))
                .unwrap();
        }
    }
}

fn assert_same_memory(a: &GuestMemoryMmap, b: &GuestMemoryMmap) {
    assert_eq!(a.num_regions(), b.num_regions());
    let mut x = vec![0u8; MIB];
    let mut y = vec![0u8; MIB];
    for (ra, rb) in a.iter().zip(b.iter()) {
        assert_eq!(ra.start_addr(), rb.start_addr());
        assert_eq!(ra.len(), rb.len());
        for off in (0..ra.len()).step_by(MIB) {
            let n = (ra.len() - off).min(MIB as u64) as usize;
            let addr = GuestAddress(ra.start_addr().0 + off);
            a.read_slice(&mut x[..n], addr).unwrap();
            b.read_slice(&mut y[..n], addr).unwrap();
            assert!(x[..n] == y[..n], "memory differs in the MiB at {addr:?}");
        }
    }
}

/// A guest that writes random pages at a set rate until stopped, honouring
/// pause and throttle like vCPUs would.
struct Dirtier {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

#[derive(Clone, Default)]
struct GuestControl {
    /// Held around each write; `true` inside means paused.
    paused: Arc<Mutex<bool>>,
    throttle: Arc<AtomicU8>,
}

impl Dirtier {
    /// Dirties `rate` pages per second among the first `working_set` pages;
    /// at a throttle of `stop_at_throttle` or more it stops writing.
    fn start(
        mem: GuestMemoryMmap,
        ctl: GuestControl,
        rate: u64,
        working_set: u64,
        stop_at_throttle: u8,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut page = [0u8; PAGE_SIZE];
            let start = Instant::now();
            let mut last = start;
            let mut credit = 0.0f64;
            let mut written = 0u64;
            // Bounded: at most 10 minutes even if never stopped.
            while !s.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(600) {
                thread::sleep(Duration::from_micros(500));
                let now = Instant::now();
                let dt = now.duration_since(last).as_secs_f64();
                last = now;
                let t = ctl.throttle.load(Ordering::SeqCst);
                if t >= stop_at_throttle {
                    continue;
                }
                credit += (rate * (100 - t as u64) / 100) as f64 * dt;
                let n = (credit as u64).min(4096);
                credit -= credit.floor();
                let guard = ctl.paused.lock().unwrap();
                if *guard {
                    continue;
                }
                for _ in 0..n {
                    rng.fill(&mut page[..64]);
                    write_page(&mem, rng.next() % working_set, &page);
                    written += 1;
                }
                drop(guard);
            }
            written
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().map_or(0, |h| h.join().unwrap())
    }
}

impl Drop for Dirtier {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fake running VM.
struct FakeSource {
    mem: GuestMemoryMmap,
    config: MigrationConfig,
    ctl: GuestControl,
    state: Vec<u8>,
    tracking: bool,
    resumes: Arc<AtomicU32>,
    stops: u32,
    throttles: Vec<u8>,
    fetches: u32,
    /// Cancels this status at the first dirty-bitmap fetch.
    cancel_on_fetch: Option<MigrationStatus>,
    /// A hot set: pages `0..hot_pages` are dirty at every fetch while the
    /// throttle is below `hot_until_throttle`.
    hot_pages: u64,
    hot_until_throttle: u8,
    /// Skip never-touched pages in the first pass (pagemap), as the VMM does.
    skip_untouched: bool,
}

impl FakeSource {
    fn new(mem: GuestMemoryMmap) -> Self {
        let config = config_of(&mem, 2);
        Self {
            mem,
            config,
            ctl: GuestControl::default(),
            state: b"device and vcpu state".to_vec(),
            tracking: false,
            resumes: Arc::default(),
            stops: 0,
            throttles: Vec::new(),
            fetches: 0,
            cancel_on_fetch: None,
            hot_pages: 0,
            hot_until_throttle: u8::MAX,
            skip_untouched: false,
        }
    }

    fn is_paused(&self) -> bool {
        *self.ctl.paused.lock().unwrap()
    }
}

impl MigrationSource for FakeSource {
    fn config(&self) -> MigrationConfig {
        self.config.clone()
    }

    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn initial_pages(&mut self) -> Option<Vec<Vec<u64>>> {
        if !self.skip_untouched {
            return None;
        }
        crate::persist::memory::touched_bitmaps(&self.mem)
    }

    fn start_dirty_tracking(&mut self) -> std::result::Result<(), HookError> {
        for r in self.mem.iter() {
            MmapRegion::bitmap(r).reset();
        }
        self.tracking = true;
        Ok(())
    }

    fn stop_dirty_tracking(&mut self) -> std::result::Result<(), HookError> {
        self.tracking = false;
        self.stops += 1;
        Ok(())
    }

    fn dirty_bitmaps(&mut self) -> std::result::Result<Vec<Vec<u64>>, HookError> {
        if !self.tracking {
            return Err("dirty tracking is off".into());
        }
        self.fetches += 1;
        if let Some(s) = &self.cancel_on_fetch {
            s.cancel();
        }
        let mut maps: Vec<Vec<u64>> = self
            .mem
            .iter()
            .map(|r| MmapRegion::bitmap(r).get_and_reset())
            .collect();
        if self.ctl.throttle.load(Ordering::SeqCst) < self.hot_until_throttle {
            for p in 0..self.hot_pages as usize {
                maps[0][p / 64] |= 1 << (p % 64);
            }
        }
        Ok(maps)
    }

    fn pause_and_save(&mut self) -> std::result::Result<Vec<u8>, HookError> {
        *self.ctl.paused.lock().unwrap() = true;
        Ok(self.state.clone())
    }

    fn resume(&mut self) -> std::result::Result<(), HookError> {
        *self.ctl.paused.lock().unwrap() = false;
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn throttle(&mut self, percent: u8) {
        self.throttles.push(percent);
        self.ctl.throttle.store(percent, Ordering::SeqCst);
    }
}

/// A fake VM being built on the receiving side.
struct FakeTarget {
    mem: GuestMemoryMmap,
    config: MigrationConfig,
    host_cpu: CpuFeatures,
    restored: Option<Vec<u8>>,
    fail_restore: bool,
    ran: bool,
    fail_run: bool,
}

impl FakeTarget {
    fn new(ranges: &[(GuestAddress, usize)]) -> Self {
        let mem = new_memory(ranges);
        let config = config_of(&mem, 2);
        Self {
            mem,
            config,
            host_cpu: cpu(),
            restored: None,
            fail_restore: false,
            ran: false,
            fail_run: false,
        }
    }
}

impl MigrationTarget for FakeTarget {
    fn config(&self) -> MigrationConfig {
        self.config.clone()
    }

    fn host_cpu(&self) -> CpuFeatures {
        self.host_cpu.clone()
    }

    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn restore(&mut self, state: Vec<u8>) -> std::result::Result<(), HookError> {
        if self.fail_restore {
            return Err("KVM_SET_REGS failed".into());
        }
        self.restored = Some(state);
        Ok(())
    }

    fn run(&mut self) -> std::result::Result<(), HookError> {
        if self.fail_run {
            return Err("KVM_RUN failed".into());
        }
        self.ran = true;
        Ok(())
    }
}

fn fast_opts() -> SendOptions {
    SendOptions {
        handshake_timeout: Duration::from_secs(10),
        running_timeout: Duration::from_secs(10),
        write_timeout: Duration::from_secs(10),
        ..SendOptions::default()
    }
}

/// Runs the receiver on its own thread.
fn spawn_receiver(
    mut stream: Stream,
    mut target: FakeTarget,
) -> JoinHandle<(Result<ReceiveReport>, FakeTarget)> {
    thread::spawn(move || {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let r = receive(&mut stream, &mut target, &ReceiveOptions::default());
        (r, target)
    })
}

/// Migrates `source` to a fresh target with the same layout over a
/// socketpair.
fn migrate(
    source: &mut FakeSource,
    target: FakeTarget,
    opts: &SendOptions,
    status: &MigrationStatus,
) -> (Result<SendReport>, Result<ReceiveReport>, FakeTarget) {
    let (mut a, b) = Stream::pair().unwrap();
    let rx = spawn_receiver(b, target);
    let sent = send(&mut a, source, opts, status);
    drop(a);
    let (received, target) = rx.join().unwrap();
    (sent, received, target)
}

#[test]
fn test_migration_idle_guest_converges_and_memory_matches() {
    let ranges = layout(16, 48);
    let mem = new_memory(&ranges);
    scatter(&mem, 500, 1);
    let mut source = FakeSource::new(mem);
    // Big enough to need several State frames.
    source.state = (0..(2 * MIB + 12345)).map(|i| (i % 251) as u8).collect();
    let status = MigrationStatus::new();
    let (sent, received, target) =
        migrate(&mut source, FakeTarget::new(&ranges), &fast_opts(), &status);
    let report = sent.unwrap();
    let rx = received.unwrap();
    assert!(report.iterations <= 1, "{report:?}");
    assert_eq!(target.restored.as_deref(), Some(source.state.as_slice()));
    assert_same_memory(&source.mem, &target.mem);
    // Zero pages travel as markers: far fewer bytes than memory.
    let total_pages = (64 * MIB / PAGE_SIZE) as u64;
    assert!(report.pages_sent >= total_pages, "{report:?}");
    assert!(report.zero_pages >= total_pages - 500, "{report:?}");
    assert!(report.bytes_sent < 8 * MIB as u64, "{report:?}");
    assert_eq!(rx.pages, report.pages_sent);
    assert_eq!(rx.state_bytes, source.state.len());
    let st = status.snapshot();
    assert_eq!(st.state, MigrationState::Completed);
    assert!(st.downtime_ms.is_some());
    assert_eq!(st.bytes_sent, report.bytes_sent);
    assert_eq!(st.pages_sent, report.pages_sent);
    assert_eq!(source.resumes.load(Ordering::SeqCst), 0);
    assert!(source.is_paused(), "a migrated source stays paused");
}

#[test]
fn test_migration_skips_never_touched_pages() {
    let ranges = layout(16, 48);
    let mem = new_memory(&ranges);
    scatter(&mem, 500, 3);
    let mut source = FakeSource::new(mem);
    source.skip_untouched = true;
    let target = FakeTarget::new(&ranges);
    let status = MigrationStatus::new();
    let (sent, received, target) = migrate(&mut source, target, &fast_opts(), &status);
    let report = sent.unwrap();
    received.unwrap();
    assert_same_memory(&source.mem, &target.mem);
    // Only the touched pages (500 scattered, each possibly sharing a page)
    // and what the dirty passes add are sent: not 16384 zero markers.
    assert!(report.pages_sent <= 600, "{report:?}");
    assert!(report.pages_sent >= 400, "{report:?}");
}

#[test]
fn test_migration_busy_guest_converges_within_budget() {
    let ranges = layout(8, 24);
    let mem = new_memory(&ranges);
    fill_random(&mem, 2);
    let mut source = FakeSource::new(mem.clone());
    // 2000 pages/s over a 1 MiB working set: converges quickly.
    let mut guest = Dirtier::start(mem, source.ctl.clone(), 2000, 256, 255);
    let status = MigrationStatus::new();
    let opts = SendOptions {
        max_downtime: Duration::from_millis(500),
        ..fast_opts()
    };
    let (sent, received, target) = migrate(&mut source, FakeTarget::new(&ranges), &opts, &status);
    let report = sent.unwrap();
    received.unwrap();
    assert!(guest.stop() > 0, "the guest wrote nothing");
    assert!(report.iterations <= opts.max_iterations, "{report:?}");
    // The guest was paused for the final pass, so both sides agree.
    assert_same_memory(&source.mem, &target.mem);
    let st = status.snapshot();
    assert_eq!(st.state, MigrationState::Completed);
    assert!(st.bandwidth_mib_per_s > 0.0, "{st:?}");
    assert_eq!(source.resumes.load(Ordering::SeqCst), 0);
}

#[test]
fn test_migration_busy_guest_not_converging_fails_and_resumes() {
    let ranges = layout(8, 24);
    let mem = new_memory(&ranges);
    let mut source = FakeSource::new(mem.clone());
    source.hot_pages = 64;
    let mut guest = Dirtier::start(mem, source.ctl.clone(), 20_000, 8192, 255);
    let status = MigrationStatus::new();
    // No downtime allowed: only an empty dirty set would do.
    let opts = SendOptions {
        max_downtime: Duration::ZERO,
        max_iterations: 3,
        ..fast_opts()
    };
    let (sent, received, target) = migrate(&mut source, FakeTarget::new(&ranges), &opts, &status);
    guest.stop();
    let e = sent.unwrap_err();
    assert!(matches!(e, MigrationError::NotConverged { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("did not converge") && msg.contains("MiB/s"),
        "{msg}"
    );
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert_eq!(source.stops, 1);
    assert!(!source.is_paused());
    assert!(source.throttles.is_empty());
    let st = status.snapshot();
    assert_eq!(st.state, MigrationState::Failed);
    assert!(st.error.unwrap().contains("did not converge"));
    // The receiver learns why and never runs the guest.
    let re = received.unwrap_err();
    assert!(
        matches!(&re, MigrationError::Peer(m) if m.contains("did not converge")),
        "{re}"
    );
    assert!(target.restored.is_none());
}

#[test]
fn test_migration_auto_converge_throttles_until_converged() {
    let ranges = layout(8, 24);
    let mem = new_memory(&ranges);
    let mut source = FakeSource::new(mem.clone());
    // Writes only stop once throttled to 40% or more.
    source.hot_pages = 64;
    source.hot_until_throttle = 40;
    let mut guest = Dirtier::start(mem, source.ctl.clone(), 20_000, 8192, 40);
    let status = MigrationStatus::new();
    let opts = SendOptions {
        max_downtime: Duration::ZERO,
        max_iterations: 2,
        auto_converge: true,
        ..fast_opts()
    };
    let (sent, received, target) = migrate(&mut source, FakeTarget::new(&ranges), &opts, &status);
    guest.stop();
    let report = sent.unwrap();
    received.unwrap();
    assert_eq!(&source.throttles[..3], &[20, 30, 40], "{report:?}");
    assert!(source.throttles.windows(2).all(|w| w[0] < w[1]));
    assert_same_memory(&source.mem, &target.mem);
    assert_eq!(status.snapshot().state, MigrationState::Completed);
    assert!(status.snapshot().throttle_percent >= 40);
}

#[test]
fn test_migration_auto_converge_gives_up_at_max_throttle() {
    let ranges = layout(4, 4);
    let mem = new_memory(&ranges);
    let mut source = FakeSource::new(mem.clone());
    // Never stops writing, even at 99%.
    source.hot_pages = 64;
    let mut guest = Dirtier::start(mem, source.ctl.clone(), 200_000, 2048, 255);
    let status = MigrationStatus::new();
    let opts = SendOptions {
        max_downtime: Duration::ZERO,
        max_iterations: 1,
        auto_converge: true,
        ..fast_opts()
    };
    let (sent, _, target) = migrate(&mut source, FakeTarget::new(&ranges), &opts, &status);
    guest.stop();
    let e = sent.unwrap_err();
    assert!(matches!(e, MigrationError::NotConverged { .. }), "{e}");
    assert_eq!(source.throttles.last(), Some(&0), "throttle lifted");
    assert!(source.throttles.contains(&99), "{:?}", source.throttles);
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert!(target.restored.is_none());
}

#[test]
fn test_migration_cancel_midway_resumes_source() {
    let ranges = layout(8, 8);
    let mem = new_memory(&ranges);
    fill_random(&mem, 3);
    let mut source = FakeSource::new(mem);
    let status = MigrationStatus::new();
    source.cancel_on_fetch = Some(status.clone());
    let (sent, received, target) =
        migrate(&mut source, FakeTarget::new(&ranges), &fast_opts(), &status);
    let e = sent.unwrap_err();
    assert!(matches!(e, MigrationError::Cancelled(_)), "{e}");
    assert_eq!(status.snapshot().state, MigrationState::Cancelled);
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert!(!source.is_paused());
    let re = received.unwrap_err();
    assert!(matches!(re, MigrationError::Cancelled(_)), "{re}");
    assert!(target.restored.is_none());
}

/// Plays the receiver's handshake on `s`: Hello, then Accept.
fn accept_handshake(s: &mut Stream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _hello = protocol::read_message(s).unwrap();
    protocol::write_message(s, &Message::Hello(Hello::ours())).unwrap();
    receiver_auth(s);
    let _config = protocol::read_message(s).unwrap();
    protocol::write_message(s, &Message::Accept).unwrap();
}

/// A receiver that accepts and then hangs up after `frames` frames.
fn flaky_receiver(mut s: Stream, frames: usize) -> JoinHandle<()> {
    thread::spawn(move || {
        accept_handshake(&mut s);
        for _ in 0..frames {
            protocol::read_message(&mut s).unwrap();
        }
        // Dropping `s` closes the socket under the sender.
    })
}

fn check_drop_resumes(mut a: Stream, b_side: JoinHandle<()>) {
    let mem = new_memory(&layout(16, 16));
    fill_random(&mem, 4);
    let mut source = FakeSource::new(mem);
    let status = MigrationStatus::new();
    let e = send(&mut a, &mut source, &fast_opts(), &status).unwrap_err();
    b_side.join().unwrap();
    assert!(matches!(e, MigrationError::Protocol(_)), "{e}");
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert_eq!(status.snapshot().state, MigrationState::Failed);
    assert!(status.snapshot().pages_sent < (32 * MIB / PAGE_SIZE) as u64);
}

#[test]
fn test_migration_receiver_drop_midway_unix_resumes_source() {
    let dir = tempfile::tempdir().unwrap();
    let uri = MigrationUri::Unix(dir.path().join("mig.sock"));
    let l = listen(&uri).unwrap();
    let a = connect(&uri, Duration::from_secs(5)).unwrap();
    let b = l.accept(Some(Duration::from_secs(5))).unwrap();
    check_drop_resumes(a, flaky_receiver(b, 5));
}

#[test]
fn test_migration_receiver_drop_midway_tcp_resumes_source() {
    let l = listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let a = connect(&l.local_uri().unwrap(), Duration::from_secs(5)).unwrap();
    let b = l.accept(Some(Duration::from_secs(5))).unwrap();
    check_drop_resumes(a, flaky_receiver(b, 5));
}

#[test]
fn test_migration_receiver_restore_or_run_failure_resumes_source() {
    // A failed restore (before Ready) and a failed run (after Go) both end
    // with the receiver's Error: the guest never ran there.
    for (fail_run, why) in [(false, "KVM_SET_REGS"), (true, "KVM_RUN")] {
        let ranges = layout(4, 4);
        let mut source = FakeSource::new(new_memory(&ranges));
        let mut target = FakeTarget::new(&ranges);
        target.fail_restore = !fail_run;
        target.fail_run = fail_run;
        let status = MigrationStatus::new();
        let (sent, received, target) = migrate(&mut source, target, &fast_opts(), &status);
        let e = sent.unwrap_err();
        assert!(
            matches!(&e, MigrationError::Peer(m) if m.contains(why)),
            "{e}"
        );
        let re = received.unwrap_err();
        assert!(matches!(re, MigrationError::Target { .. }), "{re}");
        assert!(!target.ran);
        assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
        assert!(!source.is_paused(), "paused source resumed");
    }
}

/// A receiver that plays the protocol up to `Complete`, then `script`.
fn scripted_receiver(
    mut b: Stream,
    script: impl FnOnce(&mut Stream) + Send + 'static,
) -> JoinHandle<()> {
    thread::spawn(move || {
        accept_handshake(&mut b);
        while protocol::read_message(&mut b).unwrap() != Message::Complete {}
        script(&mut b);
    })
}

fn send_to_script(
    script: impl FnOnce(&mut Stream) + Send + 'static,
) -> (MigrationError, FakeSource, MigrationStatus) {
    let (mut a, b) = Stream::pair().unwrap();
    let rx = scripted_receiver(b, script);
    let mut source = FakeSource::new(new_memory(&layout(4, 4)));
    let status = MigrationStatus::new();
    let opts = SendOptions {
        running_timeout: Duration::from_millis(300),
        ..fast_opts()
    };
    let e = send(&mut a, &mut source, &opts, &status).unwrap_err();
    drop(a);
    rx.join().unwrap();
    (e, source, status)
}

#[test]
fn test_migration_no_ready_reply_times_out_and_resumes() {
    let (e, source, _) = send_to_script(|b| {
        // Say nothing until the sender gives up.
        let _ = protocol::read_message(b);
    });
    assert!(matches!(e, MigrationError::Timeout(_, "Ready")), "{e}");
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert!(!source.is_paused());
}

#[test]
fn test_migration_link_lost_before_go_resumes_source() {
    // The receiver restored (Ready) but the link breaks before `Go` arrives:
    // it never runs the guest, so the source must.
    let (e, source, status) = send_to_script(|b| {
        b.shutdown(std::net::Shutdown::Both).unwrap();
    });
    assert!(!matches!(e, MigrationError::InDoubt(_)), "{e}");
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert!(!source.is_paused());
    assert_eq!(status.snapshot().state, MigrationState::Failed);
}

#[test]
fn test_migration_link_lost_after_go_leaves_source_paused() {
    // `Go` was delivered, then the link broke before `Running`: the receiver
    // may run the guest, so the source must not (never two copies).
    let (e, source, status) = send_to_script(|b| {
        protocol::write_message(b, &Message::Ready).unwrap();
        assert_eq!(protocol::read_message(b).unwrap(), Message::Go);
    });
    assert!(matches!(e, MigrationError::InDoubt(_)), "{e}");
    assert!(e.to_string().contains("stays paused"), "{e}");
    assert_eq!(source.resumes.load(Ordering::SeqCst), 0);
    assert!(source.is_paused());
    assert_eq!(status.snapshot().state, MigrationState::Failed);
}

fn refused(edit: impl FnOnce(&mut FakeTarget)) -> String {
    let ranges = layout(8, 8);
    let mem = new_memory(&ranges);
    scatter(&mem, 50, 5);
    let mut source = FakeSource::new(mem);
    let mut target = FakeTarget::new(&ranges);
    edit(&mut target);
    let status = MigrationStatus::new();
    let (sent, received, target) = migrate(&mut source, target, &fast_opts(), &status);
    let e = sent.unwrap_err();
    let MigrationError::Refused(reason) = e else {
        panic!("{e}")
    };
    assert!(matches!(received, Err(MigrationError::Refused(_))));
    // Nothing moved: no page sent, tracking never started, memory untouched.
    assert_eq!(status.snapshot().pages_sent, 0);
    assert_eq!(source.fetches, 0);
    assert!(!source.tracking);
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert!(target.mem.iter().all(|r| MmapRegion::bitmap(r)
        .get_and_reset()
        .iter()
        .all(|&w| w == 0)));
    assert!(target.restored.is_none());
    reason
}

#[test]
fn test_migration_config_mismatch_refused_before_memory_moves() {
    let r = refused(|t| {
        t.mem = new_memory(&layout(8, 16));
        t.config = config_of(&t.mem, 2);
    });
    assert!(r.contains("memory layout"), "{r}");
    let r = refused(|t| t.config.vcpus = 4);
    assert!(r.contains("vCPU count 2 differs from local 4"), "{r}");
    let r = refused(|t| t.config.devices.truncate(1));
    assert!(r.contains("devices missing here: net:eth0"), "{r}");
}

#[test]
fn test_migration_missing_cpu_features_refused() {
    let r = refused(|t| {
        t.host_cpu.leaf7_ebx &= !(1 << 5);
        t.host_cpu.leaf1_ecx &= !1;
    });
    assert!(r.contains("CPUID.7.0.EBX bits 0x20 missing"), "{r}");
    assert!(r.contains("CPUID.1.ECX bits 0x1 missing"), "{r}");
}

#[test]
fn test_migration_over_tcp_and_unix_listeners() {
    let dir = tempfile::tempdir().unwrap();
    for uri in [
        MigrationUri::Unix(dir.path().join("m.sock")),
        "tcp:127.0.0.1:0".parse().unwrap(),
    ] {
        let ranges = layout(8, 8);
        let mem = new_memory(&ranges);
        scatter(&mem, 300, 6);
        let l = listen(&uri).unwrap();
        let bound = l.local_uri().unwrap();
        let rx = thread::spawn(move || {
            let s = l.accept(Some(Duration::from_secs(10))).unwrap();
            spawn_receiver(s, FakeTarget::new(&ranges)).join().unwrap()
        });
        let mut a = connect(&bound, Duration::from_secs(5)).unwrap();
        let mut source = FakeSource::new(mem);
        send(&mut a, &mut source, &fast_opts(), &MigrationStatus::new()).unwrap();
        let (r, target) = rx.join().unwrap();
        r.unwrap();
        assert_same_memory(&source.mem, &target.mem);
    }
}

/// Scripted input for the receiver; its replies are collected.
struct Script {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for Script {
    fn set_read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }

    fn set_write_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// A token-less sender's answer to any challenge.
fn no_auth() -> Message {
    Message::Auth {
        nonce: [0x5a; 32],
        proof: None,
    }
}

/// Plays a token-less receiver's part of the auth exchange on `s`.
fn receiver_auth(s: &mut Stream) {
    protocol::write_message(s, &Message::Challenge { nonce: [0xa5; 32] }).unwrap();
    assert!(matches!(
        protocol::read_message(s).unwrap(),
        Message::Auth { .. }
    ));
    protocol::write_message(s, &Message::AuthOk { proof: None }).unwrap();
}

fn small_target() -> FakeTarget {
    FakeTarget::new(&[(GuestAddress(0), MIB)])
}

/// A valid sender stream for [`small_target`].
fn valid_stream(pages: &[Pages]) -> Vec<u8> {
    let t = small_target();
    let mut v = Message::Hello(Hello::ours()).encode();
    v.extend(no_auth().encode());
    v.extend(Message::Config(t.config.clone()).encode());
    for p in pages {
        v.extend(Message::Pages(p.clone()).encode());
    }
    v.extend(Message::State(b"state".to_vec()).encode());
    v.extend(Message::Complete.encode());
    v.extend(Message::Go.encode());
    v
}

fn one_page(region: u32, first_page: u64, byte: u8) -> Pages {
    Pages {
        region,
        first_page,
        count: 1,
        present: vec![1],
        data: vec![byte; PAGE_SIZE],
    }
}

fn run_script(input: Vec<u8>) -> (Result<ReceiveReport>, FakeTarget, Vec<u8>) {
    let mut t = small_target();
    let mut s = Script {
        input: Cursor::new(input),
        output: Vec::new(),
    };
    let r = receive(&mut s, &mut t, &ReceiveOptions::default());
    (r, t, s.output)
}

fn replies(out: &[u8]) -> Vec<Message> {
    let mut r = out;
    let mut v = Vec::new();
    while let Ok(m) = protocol::read_message(&mut r) {
        v.push(m);
    }
    v
}

#[test]
fn test_receiver_valid_script_runs_guest() {
    let (r, t, out) = run_script(valid_stream(&[one_page(0, 255, 7)]));
    r.unwrap();
    assert_eq!(t.restored.as_deref(), Some(&b"state"[..]));
    assert!(t.ran);
    assert_eq!(t.mem.read_obj::<u8>(GuestAddress(255 * 4096)).unwrap(), 7);
    let rep = replies(&out);
    assert!(matches!(
        rep[..],
        [
            Message::Hello(_),
            Message::Challenge { .. },
            Message::AuthOk { proof: None },
            Message::Accept,
            Message::Ready,
            Message::Running
        ]
    ));
}

#[test]
fn test_receiver_never_runs_without_go() {
    let mut stream = valid_stream(&[one_page(0, 1, 7)]);
    let go = Message::Go.encode();
    stream.truncate(stream.len() - go.len());
    for tail in [
        vec![],
        Message::Cancel {
            reason: "operator".into(),
        }
        .encode(),
        Message::Pages(one_page(0, 1, 7)).encode(),
    ] {
        let mut s = stream.clone();
        s.extend(tail);
        let (r, t, out) = run_script(s);
        assert!(r.is_err(), "{r:?}");
        assert!(t.restored.is_some());
        assert!(!t.ran, "ran without Go");
        assert!(replies(&out).contains(&Message::Ready));
    }
}

#[test]
fn test_receiver_zero_marker_clears_stale_page() {
    let mut pages = vec![one_page(0, 3, 9)];
    pages.push(Pages {
        region: 0,
        first_page: 2,
        count: 2,
        present: vec![0],
        data: vec![],
    });
    let (r, t, _) = run_script(valid_stream(&pages));
    r.unwrap();
    assert_eq!(t.mem.read_obj::<u64>(GuestAddress(3 * 4096)).unwrap(), 0);
}

#[test]
fn test_receiver_page_past_region_is_protocol_error() {
    for bad in [
        one_page(0, 256, 1),
        one_page(1, 0, 1),
        one_page(0, u64::MAX, 1),
    ] {
        let (r, t, out) = run_script(valid_stream(std::slice::from_ref(&bad)));
        let e = r.unwrap_err();
        assert!(
            matches!(e, MigrationError::PageOutOfRange { .. }),
            "{bad:?}: {e}"
        );
        assert!(t.restored.is_none());
        assert!(t.mem.iter().all(|r| MmapRegion::bitmap(r)
            .get_and_reset()
            .iter()
            .all(|&w| w == 0)));
        assert!(matches!(replies(&out).last(), Some(Message::Error { .. })));
    }
    // A run that starts inside and ends outside is refused as a whole.
    let run = Pages {
        region: 0,
        first_page: 255,
        count: 2,
        present: vec![0b11],
        data: vec![1; 2 * PAGE_SIZE],
    };
    let (r, _, _) = run_script(valid_stream(&[run]));
    assert!(matches!(r, Err(MigrationError::PageOutOfRange { .. })));
}

#[test]
fn test_receiver_truncated_and_corrupt_streams_fail_cleanly() {
    let good = valid_stream(&[one_page(0, 1, 1), one_page(0, 2, 2)]);
    for cut in (0..good.len()).step_by(97) {
        let (r, t, _) = run_script(good[..cut].to_vec());
        assert!(r.is_err(), "cut at {cut}");
        assert!(t.restored.is_none());
    }
    for i in (0..good.len()).step_by(61) {
        let mut g = good.clone();
        g[i] ^= 0x40;
        let (r, t, _) = run_script(g);
        assert!(r.is_err(), "flip at {i}");
        assert!(t.restored.is_none());
    }
}

#[test]
fn test_receiver_wrong_magic_or_version_rejected() {
    let mut h = Hello::ours();
    h.protocol_version = 99;
    let mut s = Message::Hello(h).encode();
    s.extend(valid_stream(&[]));
    let (r, _, out) = run_script(s);
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Protocol(ProtocolError::UnsupportedVersion { theirs: 99, .. })
        ),
        "{e}"
    );
    assert!(matches!(&replies(&out)[..], [Message::Error { message }] if message.contains("99")));

    let mut s = valid_stream(&[]);
    s[8..16].copy_from_slice(b"QEMU\0\0\0\0");
    let (r, _, _) = run_script(s);
    // The CRC catches the edit first; a re-framed bad magic is BadMagic.
    assert!(r.is_err());
    let mut h = Hello::ours();
    h.magic = *b"NOTWISP!";
    let (r, _, _) = run_script(Message::Hello(h).encode());
    assert!(matches!(
        r,
        Err(MigrationError::Protocol(ProtocolError::BadMagic(_)))
    ));
}

#[test]
fn test_receiver_out_of_order_messages_rejected() {
    let t = small_target();
    for script in [
        // Config before Hello.
        Message::Config(t.config.clone()).encode(),
        // Pages before Config.
        [
            Message::Hello(Hello::ours()).encode(),
            Message::Pages(one_page(0, 0, 1)).encode(),
        ]
        .concat(),
        // Pages after State.
        [
            Message::Hello(Hello::ours()).encode(),
            no_auth().encode(),
            Message::Config(t.config.clone()).encode(),
            Message::State(vec![1]).encode(),
            Message::Pages(one_page(0, 0, 1)).encode(),
        ]
        .concat(),
    ] {
        let (r, t, _) = run_script(script);
        assert!(matches!(r, Err(MigrationError::Unexpected { .. })), "{r:?}");
        assert!(t.restored.is_none());
    }
}

/// Throughput over loopback transports. Run with
/// `cargo test --release -p vmm --lib migration::tests::bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_migration_throughput() {
    let dir = tempfile::tempdir().unwrap();
    for (name, mib, random) in [
        ("1 GiB mostly zero", 1024, false),
        ("256 MiB random", 256, true),
    ] {
        for uri in [
            MigrationUri::Unix(dir.path().join("b.sock")),
            "tcp:127.0.0.1:0".parse().unwrap(),
        ] {
            let ranges = vec![(GuestAddress(0), mib * MIB)];
            let mem = new_memory(&ranges);
            if random {
                fill_random(&mem, 7);
            } else {
                scatter(&mem, 1000, 7);
            }
            let l = listen(&uri).unwrap();
            let bound = l.local_uri().unwrap();
            let r2 = ranges.clone();
            let rx = thread::spawn(move || {
                let s = l.accept(Some(Duration::from_secs(10))).unwrap();
                spawn_receiver(s, FakeTarget::new(&r2)).join().unwrap()
            });
            let mut a = connect(&bound, Duration::from_secs(5)).unwrap();
            let mut source = FakeSource::new(mem);
            let rep = send(&mut a, &mut source, &fast_opts(), &MigrationStatus::new()).unwrap();
            let (r, target) = rx.join().unwrap();
            r.unwrap();
            assert_same_memory(&source.mem, &target.mem);
            let secs = rep.total.as_secs_f64();
            println!(
                "{name} over {}: {:.3} s, {:.0} MiB/s of guest memory, {:.0} MiB/s on the wire, \
                 {} MiB sent, downtime {:?}",
                if matches!(bound, MigrationUri::Unix(_)) {
                    "unix"
                } else {
                    "tcp"
                },
                secs,
                mib as f64 / secs,
                rep.bytes_sent as f64 / MIB as f64 / secs,
                rep.bytes_sent / MIB as u64,
                rep.downtime,
            );
        }
    }
}

#[test]
fn test_migration_cancel_from_another_thread_during_precopy() {
    // Cancelling from another thread races with a transfer of ~50 ms; on a
    // busy host the watcher may not run in time, so try a few times and
    // require one attempt that was really cancelled midway.
    for _ in 0..10 {
        let ranges = layout(32, 32);
        let mem = new_memory(&ranges);
        fill_random(&mem, 8);
        let mut source = FakeSource::new(mem);
        let status = MigrationStatus::new();
        let watcher = {
            let status = status.clone();
            thread::spawn(move || {
                let t0 = Instant::now();
                while status.snapshot().bytes_sent < 4 * MIB as u64 && t0.elapsed().as_secs() < 10 {
                    thread::sleep(Duration::from_micros(200));
                }
                status.cancel();
            })
        };
        let (sent, received, target) =
            migrate(&mut source, FakeTarget::new(&ranges), &fast_opts(), &status);
        watcher.join().unwrap();
        let Err(e) = sent else {
            continue;
        };
        assert!(matches!(e, MigrationError::Cancelled(_)), "{e}");
        let st = status.snapshot();
        assert_eq!(st.state, MigrationState::Cancelled);
        assert!(st.pages_sent < (64 * MIB / PAGE_SIZE) as u64, "{st:?}");
        assert!(st.error.unwrap().contains("cancelled"));
        assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
        assert!(matches!(received, Err(MigrationError::Cancelled(_))));
        assert!(target.restored.is_none());
        return;
    }
    panic!("the migration finished before the cancel in every attempt");
}

/// Runs the sender against a receiver that answers `Hello` with `reply`.
fn send_against_hello_reply(reply: Message) -> (MigrationError, FakeSource, Vec<Message>) {
    let (mut a, mut b) = Stream::pair().unwrap();
    let rx = thread::spawn(move || {
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        protocol::read_message(&mut b).unwrap();
        protocol::write_message(&mut b, &reply).unwrap();
        let mut got = Vec::new();
        while let Ok(m) = protocol::read_message(&mut b) {
            got.push(m);
        }
        got
    });
    let mut source = FakeSource::new(new_memory(&layout(1, 1)));
    let status = MigrationStatus::new();
    let e = send(&mut a, &mut source, &fast_opts(), &status).unwrap_err();
    drop(a);
    assert_eq!(status.snapshot().state, MigrationState::Failed);
    assert_eq!(status.snapshot().pages_sent, 0);
    (e, source, rx.join().unwrap())
}

#[test]
fn test_migration_sender_rejects_receiver_with_other_version() {
    let mut h = Hello::ours();
    h.protocol_version = 7;
    let (e, source, got) = send_against_hello_reply(Message::Hello(h));
    assert!(
        matches!(
            e,
            MigrationError::Protocol(ProtocolError::UnsupportedVersion { theirs: 7, .. })
        ),
        "{e}"
    );
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert!(matches!(&got[..], [Message::Error { message }] if message.contains("version 7")));
}

#[test]
fn test_migration_sender_reports_receiver_error() {
    let (e, _, got) = send_against_hello_reply(Message::Error {
        message: "Unsupported migration protocol version 1".into(),
    });
    assert!(
        matches!(&e, MigrationError::Peer(m) if m.contains("version 1")),
        "{e}"
    );
    assert!(got.is_empty(), "no reply to a peer's error: {got:?}");
}

#[test]
fn test_receiver_state_over_limit_rejected() {
    let t = small_target();
    let mut s = Message::Hello(Hello::ours()).encode();
    s.extend(no_auth().encode());
    s.extend(Message::Config(t.config.clone()).encode());
    let chunk = Message::State(vec![0xab; protocol::MAX_STATE_CHUNK]).encode();
    for _ in 0..=(receiver::MAX_STATE_LEN / protocol::MAX_STATE_CHUNK) {
        s.extend_from_slice(&chunk);
    }
    s.extend(Message::Complete.encode());
    let (r, t, _) = run_script(s);
    assert!(
        matches!(r, Err(MigrationError::StateTooLarge { .. })),
        "{r:?}"
    );
    assert!(t.restored.is_none());
}

#[test]
fn test_migration_send_to_and_receive_from_uri() {
    let dir = tempfile::tempdir().unwrap();
    let uri = MigrationUri::Unix(dir.path().join("dest.sock"));
    let ranges = layout(4, 4);
    let mem = new_memory(&ranges);
    scatter(&mem, 100, 9);
    let (u2, r2) = (uri.clone(), ranges.clone());
    let rx = thread::spawn(move || {
        let mut t = FakeTarget::new(&r2);
        let r = receive_from(
            &u2,
            Some(Duration::from_secs(10)),
            &ReceiveOptions::with_timeout(Duration::from_secs(10)),
            &mut t,
        );
        (r, t)
    });
    let mut source = FakeSource::new(mem);
    let status = MigrationStatus::new();
    send_to(
        &uri,
        Duration::from_secs(10),
        &mut source,
        &fast_opts(),
        &status,
    )
    .unwrap();
    let (r, target) = rx.join().unwrap();
    r.unwrap();
    assert_same_memory(&source.mem, &target.mem);
    assert!(!uri_path_exists(&uri), "receiver removed its socket");

    // Nobody listening: a clear error, status failed.
    let status = MigrationStatus::new();
    let e = send_to(
        &uri,
        Duration::from_millis(100),
        &mut source,
        &fast_opts(),
        &status,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Transport(TransportError::ConnectTimeout { .. })
        ),
        "{e}"
    );
    assert_eq!(status.snapshot().state, MigrationState::Failed);

    // No sender: the receiver gives up.
    let mut t = FakeTarget::new(&ranges);
    let e = receive_from(
        &uri,
        Some(Duration::from_millis(100)),
        &ReceiveOptions::with_timeout(Duration::from_secs(1)),
        &mut t,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Transport(TransportError::AcceptTimeout { .. })
        ),
        "{e}"
    );
}

fn uri_path_exists(uri: &MigrationUri) -> bool {
    matches!(uri, MigrationUri::Unix(p) if p.exists())
}

#[test]
fn test_migration_stalled_receiver_write_timeout_resumes_source() {
    let (mut a, mut b) = Stream::pair().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let rx = thread::spawn(move || {
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        protocol::read_message(&mut b).unwrap();
        protocol::write_message(&mut b, &Message::Hello(Hello::ours())).unwrap();
        receiver_auth(&mut b);
        protocol::read_message(&mut b).unwrap();
        protocol::write_message(&mut b, &Message::Accept).unwrap();
        // Stop reading, keep the socket open until the sender gave up.
        let _ = done_rx.recv_timeout(Duration::from_secs(10));
    });
    let mem = new_memory(&layout(16, 16));
    fill_random(&mem, 10);
    let mut source = FakeSource::new(mem);
    let status = MigrationStatus::new();
    let opts = SendOptions {
        write_timeout: Duration::from_millis(200),
        ..fast_opts()
    };
    let t0 = Instant::now();
    let e = send(&mut a, &mut source, &opts, &status).unwrap_err();
    done_tx.send(()).unwrap();
    rx.join().unwrap();
    assert!(
        matches!(e, MigrationError::Protocol(ProtocolError::Timeout)),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert_eq!(status.snapshot().state, MigrationState::Failed);
}

mod security;
