//! How a thread waits for another process: the one place that decides between spinning,
//! yielding and sleeping on a futex.
//!
//! Spinning pays only while the thread we wait for runs on *another* core. On a host with
//! more willing spinners than cores, fixed spin budgets steal each other's time slices: the
//! thread that would answer is runnable but waits behind spinners, and throughput falls far
//! below plain sleeping. Sleeping at once has its own cost, though: every answer then needs
//! a futex wake-up, and on a VM a wake-up onto an idle (halted) vCPU costs tens of
//! microseconds. So the default policy, [`Spin::Adaptive`], is an idle strategy in the
//! manner of Aeron's backoff strategy — spin, then yield, then park — with these rules:
//!
//! * **Spin only with a seat.** Spinning needs one of the bus's spin seats ([`Seats`]), a
//!   row of words in the shared segment, as many as this process has cores. So the whole
//!   bus never has more spinning threads than cores. A serving thread keeps its seat while
//!   it works, so an instance handling a request is not crowded out by idle spinners.
//! * **Spin only with a spare core.** Seats count only our own spinners; the kernel knows
//!   who else wants a core. An adaptive waiter spins only while threads have not been
//!   queueing for cores: the kernel's CPU pressure (`/proc/pressure/cpu`, `some`: time in
//!   which at least one runnable thread waited) grew by less than [`STALL_BUSY`] of the
//!   last interval, sampled at most every [`LOAD_SAMPLE`] per process. (Without PSI, the
//!   runnable-thread count of `/proc/loadavg` is the fallback.) A thread that has just
//!   woken a sleeping peer also checks the instantaneous count plus that peer against the
//!   cores: the peer needs a core now.
//! * **Spin only for work in progress.** A caller stops spinning once its request has sat
//!   untaken for [`UNTAKEN_GRACE`] (unless it has just woken that instance): the instance
//!   is busy with a queue, and the caller's spinning would only slow it. A spinner calls
//!   `sched_yield` every [`SPIN_YIELD_EVERY`], so a peer woken onto its core runs at once.
//! * **Then yield** ([`CALLER_YIELD`], [`SERVER_YIELD`]): whether or not it could spin,
//!   the waiter polls and calls `sched_yield` between polls. A yielding thread never keeps
//!   a core from a thread that wants one (the scheduler runs that thread instead), so this
//!   phase needs no seat and no spare core; but its core stays awake, and an answer that
//!   comes within the phase costs neither side a futex wake-up. This is what made the
//!   default faster than blocking in every cell of the load matrix, most where threads
//!   outnumber cores (2-core VM, `aegisctl bench --matrix --repeat 3`, default/blocking:
//!   8 callers × 3 instances 0.96× before, 1.9× with it; 1 × 2 0.57× before, 2.7× with
//!   it; 8 × 1 0.99× before, 6× with it). The cost is CPU time that would otherwise be
//!   idle, at most one phase per wait, and that the scheduler sees a yielding core as busy
//!   when it places a woken thread (the seed's stress scenario, 1,000 mostly idle caller
//!   threads: p99 83–91 µs over 60 s, but 20 s runs moved from 0.3–0.7 ms to 1.0–2.1 ms).
//! * **A learned budget** per waiter ([`Backoff`]) decides whether to spin and yield at
//!   all: a wait that ended while spinning or yielding sets the budget to about twice
//!   what it took; a wait that outlasted both phases halves it, down to zero, and at zero
//!   the waiter sleeps at once (with a short probe every [`PROBE_EVERY`] waits). A
//!   caller's budget also grows when a wait ended soon after it parked, up to
//!   [`ADAPTIVE_MAX_SPIN`]; a serving thread's only from waits that ended before it
//!   parked, up to [`SERVER_MAX_SPIN`]. So an instance whose requests come seldom, or a
//!   caller of slow handlers, stops spending CPU on waits that never pay.
//!
//! [`Spin::Fixed`] spins exactly the given time (no seat, no learning) for users who pin
//! threads to cores; `Fixed(Duration::ZERO)` is pure blocking.
//!
//! The seat word carries no data: it only counts spinners, so every access is Relaxed. A
//! process that dies holding a seat (killed mid-spin) is found by the next waiter that sees
//! every seat taken (at most every [`RECLAIM_EVERY`] per process), which frees its seats.

use std::sync::atomic::AtomicU64 as StdAtomicU64;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::shm::layout::SpinSeat;
use crate::shm::sync::{spin_hint, Ordering};

/// How a waiting thread spends the time before it sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spin {
    /// Spin only with a free core (a spin seat), then yield the core between polls for a
    /// while, then sleep — as long as that has recently paid off; otherwise sleep at once.
    /// Meant never to be slower than blocking (see the
    /// README's load matrix for where that holds).
    #[default]
    Adaptive,
    /// Spin exactly this long, then sleep (`Duration::ZERO`: sleep at once). For threads
    /// pinned to their own cores.
    Fixed(Duration),
}

impl Spin {
    /// `None` → adaptive, `Some(µs)` → fixed: the command-line convention (`--spin-us`).
    pub fn from_micros(us: Option<u64>) -> Spin {
        us.map_or(Spin::Adaptive, |us| Spin::Fixed(Duration::from_micros(us)))
    }
}

/// The longest an adaptive waiter spins before sleeping.
pub const ADAPTIVE_MAX_SPIN: Duration = Duration::from_micros(50);
/// The longest an adaptive serving thread spins: about what a futex wake-up costs. Spinning
/// longer for the next request saves no latency over sleeping, and takes a core from the
/// callers (the calling side spins up to [`ADAPTIVE_MAX_SPIN`]: it waits for one reply,
/// not for whoever calls next).
pub const SERVER_MAX_SPIN: Duration = Duration::from_micros(10);
/// How long an adaptive caller polls and yields (after spinning, or instead of it) before
/// it sleeps: see [`Waiter::spin`]. A wait longer than that costs at most this much CPU.
pub const CALLER_YIELD: Duration = Duration::from_micros(50);
/// How long an adaptive serving thread polls and yields for the next request before it
/// sleeps. A caller that finds it awake saves a futex wake-up on both sides.
pub const SERVER_YIELD: Duration = Duration::from_micros(20);
/// Budgets below this are zero: a spin that short never beats the futex path's own cost.
const MIN_SPIN: Duration = Duration::from_micros(1);
/// An adaptive spinner calls `sched_yield` this often: a thread woken onto its core (the
/// sample of runnable threads is older than that) runs at once instead of waiting for the
/// spin to end. Where nothing else is runnable the call returns at once.
pub const SPIN_YIELD_EVERY: Duration = Duration::from_micros(5);
/// How often (per process, at most) a waiter that found every seat taken checks for seats
/// held by dead processes.
pub const RECLAIM_EVERY: Duration = Duration::from_millis(100);

/// How old a sample of the host's load may be.
pub const LOAD_SAMPLE: Duration = Duration::from_millis(1);

/// What the host's scheduler says, sampled at most every [`LOAD_SAMPLE`] per process:
/// whether threads queued for a core during the last interval, and how many are runnable.
#[derive(Clone, Copy)]
struct HostLoad {
    /// Threads spent more than [`STALL_BUSY`] of the interval waiting for a core.
    busy: bool,
    /// Runnable threads at the sample (the fourth field of `/proc/loadavg`).
    runnable: Option<usize>,
}

/// The share of an interval in which some thread waited for a core (PSI's `some`) above
/// which the host counts as busy.
pub const STALL_BUSY: f64 = 0.05;

fn host_load() -> HostLoad {
    use std::os::unix::fs::FileExt;
    // (sample time in µs since EPOCH) << 17 | busy << 16 | (runnable threads + 1, 0 = unknown)
    static SAMPLE: StdAtomicU64 = StdAtomicU64::new(0);
    // The previous PSI reading: (stall µs total, sample time in µs). Written only by the
    // thread that won the refresh (a rare overlap of two refreshes skews one sample).
    static PREV_STALL: StdAtomicU64 = StdAtomicU64::new(0);
    static PREV_AT: StdAtomicU64 = StdAtomicU64::new(0);
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    static LOADAVG: OnceLock<Option<std::fs::File>> = OnceLock::new();
    static PRESSURE: OnceLock<Option<std::fs::File>> = OnceLock::new();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let decode = |s: u64| HostLoad {
        busy: s >> 16 & 1 == 1,
        runnable: (s & 0xffff).checked_sub(1).map(|n| n as usize),
    };
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1;
    let s = SAMPLE.load(relaxed);
    if s != 0 && now.saturating_sub(s >> 17) < LOAD_SAMPLE.as_micros() as u64 {
        return decode(s);
    }
    // One thread refreshes; the others use the old sample meanwhile. Relaxed: the word is
    // the whole message.
    if SAMPLE
        .compare_exchange(s, now << 17 | (s & 0x1ffff), relaxed, relaxed)
        .is_err()
    {
        return decode(s);
    }
    let read = |file: &OnceLock<Option<std::fs::File>>, path: &str, buf: &mut [u8]| {
        let f = file
            .get_or_init(|| std::fs::File::open(path).ok())
            .as_ref()?;
        let n = f.read_at(buf, 0).ok()?;
        Some(n)
    };
    let mut buf = [0u8; 256];
    let runnable =
        read(&LOADAVG, "/proc/loadavg", &mut buf).and_then(|n| runnable_threads(&buf[..n]));
    let stall =
        read(&PRESSURE, "/proc/pressure/cpu", &mut buf).and_then(|n| stall_total_us(&buf[..n]));
    let busy = match stall {
        Some(total) => {
            let (prev, at) = (PREV_STALL.swap(total, relaxed), PREV_AT.swap(now, relaxed));
            let span = now.saturating_sub(at).max(1);
            at != 0 && total.saturating_sub(prev) as f64 > STALL_BUSY * span as f64
        }
        // No PSI: judge by the runnable threads alone.
        None => runnable.is_some_and(|r| r > cores()),
    };
    let code = runnable.map_or(0, |r| r.min(0xfffe) as u64 + 1);
    SAMPLE.store(now << 17 | (busy as u64) << 16 | code, relaxed);
    HostLoad { busy, runnable }
}

/// Whether the host has a core for `more` threads beyond those runnable now, and threads
/// have not been queueing for cores lately (unknown: yes).
pub fn host_has_spare_cores(more: usize) -> bool {
    let l = host_load();
    !l.busy && (more == 0 || l.runnable.is_none_or(|r| r + more <= cores()))
}

/// The `some … total=N` figure of `/proc/pressure/cpu`: microseconds in which at least one
/// thread waited for a core.
fn stall_total_us(text: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(text).ok()?;
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

thread_local! {
    /// Set when this thread woke a sleeping peer: that peer now wants a core too.
    static WOKE_A_SLEEPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tells the wait policy that this thread just woke a sleeping thread (futex wake).
pub fn woke_a_sleeper() {
    WOKE_A_SLEEPER.set(true);
}

/// The runnable-thread count of a `/proc/loadavg` line (`0.50 0.40 0.30 3/120 4567`).
fn runnable_threads(line: &[u8]) -> Option<usize> {
    let field = std::str::from_utf8(line).ok()?.split_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

/// A waiter's learned spin budget. Start optimistic: the first waits teach it.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    budget_ns: u64,
    /// Serving threads learn only from spins (see [`Backoff::server`]).
    server: bool,
    /// Waits since the budget fell to zero (a zero budget probes now and then).
    idle_waits: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            budget_ns: ADAPTIVE_MAX_SPIN.as_nanos() as u64,
            server: false,
            idle_waits: 0,
        }
    }
}

/// A zero budget spins this long on every [`PROBE_EVERY`]th wait, to notice when spinning
/// would pay again.
pub const PROBE_SPIN: Duration = Duration::from_micros(5);
pub const PROBE_EVERY: u32 = 16;

impl Backoff {
    /// A serving thread's budget. It grows only when a spin or yield caught a request: an idle
    /// instance whose requests arrive soon after it parks is one of several that a caller
    /// takes turns with, and its spinning would take the core that caller and the instance
    /// it is calling need. (Measured, 2-core VM, 1 caller × 3 instances: 42 k calls/s when
    /// serving threads also grew on short parked waits, against 72 k blocking.)
    pub fn server() -> Backoff {
        Backoff {
            server: true,
            budget_ns: SERVER_MAX_SPIN.as_nanos() as u64,
            idle_waits: 0,
        }
    }

    pub fn budget(&self) -> Duration {
        Duration::from_nanos(self.budget_ns)
    }

    /// The budget for the next wait: the learned one, or a short probe now and then while
    /// it is zero.
    fn next_budget(&mut self) -> Duration {
        if self.budget_ns > 0 {
            return self.budget();
        }
        self.idle_waits = self.idle_waits.wrapping_add(1);
        if self.idle_waits % PROBE_EVERY == 0 {
            PROBE_SPIN
        } else {
            Duration::ZERO
        }
    }

    /// Learns from one wait that took `waited` and ended while spinning (`during_spin`) or
    /// after parking.
    pub fn learn(&mut self, waited: Duration, during_spin: bool) {
        let max = if self.server {
            SERVER_MAX_SPIN
        } else {
            ADAPTIVE_MAX_SPIN
        }
        .as_nanos() as u64;
        let w = waited.as_nanos().min(max as u128) as u64;
        let target = (2 * w + MIN_SPIN.as_nanos() as u64).min(max);
        self.budget_ns = if during_spin {
            // Paid off: keep at least twice what it took, and let a larger budget decay
            // slowly towards it (waits got shorter).
            target.max(self.budget_ns - self.budget_ns / 8)
        } else if !self.server && (waited.as_nanos() as u64) < max {
            // Parked, yet the wait was short: spinning would have caught it.
            target.max(self.budget_ns.saturating_mul(2)).min(max)
        } else if self.budget_ns / 2 < MIN_SPIN.as_nanos() as u64 {
            0
        } else {
            self.budget_ns / 2
        };
    }
}

/// The spin seats this process may use (as many as it has cores).
#[derive(Clone, Copy)]
pub struct Seats<'a> {
    seats: &'a [SpinSeat],
}

/// A held spin seat; dropping it frees the seat.
pub struct Seat<'a> {
    seat: &'a SpinSeat,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        // Relaxed: the seat guards no data (see the module docs).
        self.seat.holder.store(0, Ordering::Relaxed);
    }
}

fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn own_pid() -> u32 {
    static PID: OnceLock<u32> = OnceLock::new();
    *PID.get_or_init(std::process::id)
}

impl<'a> Seats<'a> {
    pub fn new(all: &'a [SpinSeat]) -> Seats<'a> {
        Seats {
            seats: &all[..cores().min(all.len())],
        }
    }

    /// No seats: an adaptive waiter never spins (tests, and processes without a session).
    pub fn none() -> Seats<'static> {
        Seats { seats: &[] }
    }

    /// Takes a free seat, if any.
    pub fn take(&self) -> Option<Seat<'a>> {
        let pid = own_pid();
        for s in self.seats {
            if s.holder.load(Ordering::Relaxed) == 0
                && s.holder
                    .compare_exchange(0, pid, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(Seat { seat: s });
            }
        }
        self.reclaim_dead();
        None
    }

    /// Frees seats whose holder process no longer exists (rate-limited per process).
    fn reclaim_dead(&self) {
        static LAST: StdAtomicU64 = StdAtomicU64::new(0);
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
        let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) < RECLAIM_EVERY.as_millis() as u64
            || LAST
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        for s in self.seats {
            let pid = s.holder.load(Ordering::Relaxed);
            if pid != 0 && pid != own_pid() && !crate::shm::sys::process_exists(pid) {
                let _ = s
                    .holder
                    .compare_exchange(pid, 0, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
    }
}

/// What a spinning waiter sees of the thing it waits for. A waiter polls with `poll(deep)`:
/// `deep` false (most polls) asks only whether it is [`Poll::Ready`], and a poll may then
/// answer [`Poll::Working`] for anything else without looking further; `deep` true (only
/// when the waiter's grace for an untaken request has passed) asks it to tell
/// [`Poll::Working`] from [`Poll::NotStarted`], which may cost a look at a line the peer
/// writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    Ready,
    /// The peer is working on it (or nothing is known): worth spinning for.
    Working,
    /// The peer has not started on it (a request still in the ring): it is asleep or busy
    /// with other requests, so the reply is not imminent.
    NotStarted,
}

/// How long an adaptive caller spins for a request the instance has not taken yet, unless
/// the caller has just woken that instance. A spinning instance takes a request within a
/// fraction of a microsecond; one that has not, though awake, is working through a queue,
/// and a caller spinning meanwhile only takes a core from it. (Measured, 2-core VM, 8 callers × 3
/// instances: 180 k calls/s spinning through, 213 k blocking.)
pub const UNTAKEN_GRACE: Duration = Duration::from_micros(2);

/// One thread's waiting state: policy, learned budget and (for serving threads, which keep
/// it while they work) a held seat.
pub struct Waiter<'a> {
    pub policy: Spin,
    pub backoff: Backoff,
    seats: Seats<'a>,
    seat: Option<Seat<'a>>,
    /// When the current wait started on the clock, read only once the wait outlasts its
    /// first [`POLLS_BEFORE_CLOCK`] polls (see [`Waiter::started`]).
    started: Option<Instant>,
}

/// How many polls a spin makes before it first reads the clock (and then between clock
/// reads). A clock read costs about as much as a cache miss (30 ns on the CI VM, where a
/// spinning round trip is 1.2–1.4 µs): a wait that ends within these polls (a reply
/// already there, or a quick peer) reads none, and counts as having taken no time.
pub const POLLS_BEFORE_CLOCK: u32 = 32;

/// Where a wait ends at the latest, whatever its policy.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// At this instant (a call's deadline).
    At(Instant),
    /// This long after the wait started ([`Waiter::started`]).
    After(Duration),
}

impl Limit {
    fn from(self, start: Instant) -> Instant {
        match self {
            Limit::At(d) => d,
            Limit::After(t) => start + t,
        }
    }
}

impl<'a> Waiter<'a> {
    pub fn new(policy: Spin, backoff: Backoff, seats: Seats<'a>) -> Waiter<'a> {
        Waiter {
            policy,
            backoff,
            seats,
            seat: None,
            started: None,
        }
    }

    /// When the current wait started: the clock is read now if the wait has not read it
    /// yet (it ended its spin within its first polls, or never spun).
    pub fn started(&mut self) -> Instant {
        *self.started.get_or_insert_with(Instant::now)
    }

    /// Uses these seats from now on (a held seat of the previous ones is kept until parking).
    pub fn set_seats(&mut self, seats: Seats<'a>) {
        self.seats = seats;
    }

    /// The thread has work in hand (a serving thread took a request): keep a seat while
    /// it works, so idle spinners do not crowd it out. Adaptive policy only.
    pub fn working(&mut self) {
        if self.policy == Spin::Adaptive && self.seat.is_none() && host_has_spare_cores(0) {
            self.seat = self.seats.take();
        }
    }

    /// The spin and yield phases: returns true as soon as `poll` says [`Poll::Ready`], or
    /// false when the policy says to sleep now (or `limit` passed). Adaptive: spins only
    /// with a seat (giving up when the request is still [`Poll::NotStarted`]
    /// [`UNTAKEN_GRACE`] into the spin), then yields
    /// for [`CALLER_YIELD`] or [`SERVER_YIELD`]. Fixed: spins exactly its budget. A new
    /// wait: [`Waiter::started`] and [`Waiter::learn`] are about it from here on.
    pub fn spin(&mut self, limit: Option<Limit>, mut poll: impl FnMut(bool) -> Poll) -> bool {
        self.started = None;
        match self.policy {
            Spin::Fixed(d) => spin_for(d, None, (&mut self.started, limit), &mut poll),
            // An answer already there costs no load sample, seat or clock read.
            Spin::Adaptive if poll(false) == Poll::Ready => true,
            Spin::Adaptive => {
                let budget = self.backoff.next_budget();
                if budget.is_zero() {
                    // Lately the waits outlasted both phases: sleep at once.
                    WOKE_A_SLEEPER.set(false);
                    self.seat = None;
                    return poll(false) == Poll::Ready;
                }
                self.spin_phase(budget, limit, &mut poll) || self.yield_phase(limit, &mut poll)
            }
        }
    }

    /// The adaptive spin phase: only with a seat, a spare core and a learned budget.
    fn spin_phase(
        &mut self,
        budget: Duration,
        limit: Option<Limit>,
        poll: &mut impl FnMut(bool) -> Poll,
    ) -> bool {
        // A peer this thread just woke needs a core as well: count it.
        let woke = WOKE_A_SLEEPER.replace(false);
        if !host_has_spare_cores(woke as usize) {
            // Threads queue for a core: no spinning now.
            return false;
        }
        if self.seat.is_none() {
            self.seat = self.seats.take();
        }
        if self.seat.is_none() {
            // Every core has a spinner already.
            return false;
        }
        // A peer we just woke takes a wake-up's time to start; one we did not wake and that
        // has not started is busy elsewhere (see UNTAKEN_GRACE).
        let grace = if woke { budget } else { UNTAKEN_GRACE };
        spin_for(budget, Some(grace), (&mut self.started, limit), poll)
    }

    /// The adaptive yield phase: poll, and between polls hand the core to any thread
    /// waiting for it (`sched_yield`), so waiting this way never takes a core from a thread
    /// that has work. It keeps this thread's core awake, and answers sooner than a futex
    /// wake-up, whenever the reply (or the next request) comes within the phase.
    fn yield_phase(&mut self, limit: Option<Limit>, poll: &mut impl FnMut(bool) -> Poll) -> bool {
        // A yielding thread does not hold a core: free the seat for a spinner.
        self.seat = None;
        let phase = if self.backoff.server {
            SERVER_YIELD
        } else {
            CALLER_YIELD
        };
        let now = Instant::now();
        let start = *self.started.get_or_insert(now);
        let until = limit.map_or(now + phase, |l| l.from(start).min(now + phase));
        loop {
            if poll(false) == Poll::Ready {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// About to sleep on a futex: give the seat back.
    pub fn parking(&mut self) {
        self.seat = None;
    }

    /// Learns from the wait just finished (adaptive policy only: a fixed spin reads no
    /// clock for it), which ended while spinning or yielding (`during_spin`) or after
    /// parking.
    pub fn learn(&mut self, during_spin: bool) {
        if self.policy == Spin::Adaptive {
            let waited = self.started.map_or(Duration::ZERO, |s| s.elapsed());
            self.backoff.learn(waited, during_spin);
        }
    }
}

/// Spins until `poll` says [`Poll::Ready`] (true), or `budget` or the limit passes
/// (false). With a `grace` (adaptive spinning), also gives up when, `grace` after the first
/// clock read, a deep poll says [`Poll::NotStarted`], and yields the core every
/// [`SPIN_YIELD_EVERY`]. The clock is read every [`POLLS_BEFORE_CLOCK`] polls, first after
/// that many (the budget and the grace count from there; `started` is the wait's start,
/// set then if unset).
fn spin_for(
    budget: Duration,
    grace: Option<Duration>,
    (started, limit): (&mut Option<Instant>, Option<Limit>),
    poll: &mut impl FnMut(bool) -> Poll,
) -> bool {
    if budget.is_zero() {
        return poll(false) == Poll::Ready;
    }
    // (until, next_yield, grace_ends) from the first clock read on.
    let mut times: Option<(Instant, Instant, Option<Instant>)> = None;
    let mut i = 0u32;
    loop {
        if poll(false) == Poll::Ready {
            return true;
        }
        spin_hint();
        i = i.wrapping_add(1);
        if i % POLLS_BEFORE_CLOCK == 0 {
            let now = Instant::now();
            let start = *started.get_or_insert(now);
            let (until, next_yield, grace_ends) = times.get_or_insert_with(|| {
                let until = limit.map_or(now + budget, |l| l.from(start).min(now + budget));
                (until, now + SPIN_YIELD_EVERY, grace.map(|g| now + g))
            });
            if now >= *until {
                return false;
            }
            if grace.is_some() {
                // The peer's progress is asked for only once the grace is over: most
                // waits end before, without a look at it. Once started, it stays so.
                if grace_ends.is_some_and(|ends| now >= ends) {
                    match poll(true) {
                        Poll::Ready => return true,
                        Poll::NotStarted => return false,
                        Poll::Working => *grace_ends = None,
                    }
                }
                if now >= *next_yield {
                    std::thread::yield_now();
                    *next_yield = now + SPIN_YIELD_EVERY;
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_budget_grows_when_spinning_would_have_paid_and_halves_when_not() {
        let mut b = Backoff {
            budget_ns: 0,
            ..Backoff::default()
        };
        b.learn(Duration::from_micros(5), false);
        assert_eq!(b.budget(), Duration::from_micros(11), "short parked wait");
        b.learn(Duration::from_micros(2), true);
        assert!(b.budget() >= Duration::from_micros(5) && b.budget() < Duration::from_micros(11));
        let before = b.budget();
        b.learn(Duration::from_millis(3), false);
        assert_eq!(b.budget(), before / 2, "a spin that came to nothing halves");
        for _ in 0..10 {
            b.learn(Duration::from_millis(3), false);
        }
        assert_eq!(b.budget(), Duration::ZERO, "long waits park at once");
    }

    #[test]
    fn the_stall_total_is_read_from_a_pressure_file() {
        let text = b"some avg10=40.80 avg60=35.84 avg300=19.44 total=129613083\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(stall_total_us(text), Some(129_613_083));
        assert_eq!(stall_total_us(b"full total=3\n"), None);
    }

    #[test]
    fn the_runnable_count_is_read_from_a_loadavg_line() {
        assert_eq!(runnable_threads(b"0.50 0.40 0.30 3/120 4567\n"), Some(3));
        assert_eq!(runnable_threads(b"garbage"), None);
        // The real file parses on this machine.
        let line = std::fs::read("/proc/loadavg").unwrap();
        assert!(
            runnable_threads(&line).is_some_and(|n| n >= 1),
            "the reader itself runs"
        );
    }

    #[test]
    fn seats_are_limited_and_freed_on_drop() {
        let all: Vec<SpinSeat> = (0..4)
            .map(|_| SpinSeat {
                holder: crate::shm::sync::AtomicU32::new(0),
            })
            .collect();
        let seats = Seats { seats: &all[..2] };
        let a = seats.take().expect("first seat");
        let b = seats.take().expect("second seat");
        assert!(seats.take().is_none(), "no more spinners than seats");
        drop(a);
        assert!(seats.take().is_some());
        drop(b);
    }

    #[test]
    fn a_seat_held_by_a_dead_process_is_reclaimed() {
        let all: Vec<SpinSeat> = (0..1)
            .map(|_| SpinSeat {
                holder: crate::shm::sync::AtomicU32::new(0),
            })
            .collect();
        // A pid that cannot exist (above pid_max's hard limit of 2^22).
        all[0].holder.store((1 << 22) + 7, Ordering::Relaxed);
        let seats = Seats { seats: &all };
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = loop {
            if let Some(s) = seats.take() {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(RECLAIM_EVERY / 4); // the reclaim is rate-limited by time
        };
        assert!(got.is_some(), "the dead holder's seat must come back");
    }

    #[test]
    fn an_adaptive_waiter_without_a_seat_yields_for_its_phase_then_gives_up() {
        for (backoff, phase) in [
            (Backoff::default(), CALLER_YIELD),
            (Backoff::server(), SERVER_YIELD),
        ] {
            // A preempted first poll can outlast the whole phase on a loaded machine:
            // "looks again" needs one of up to 50 waits.
            let mut looked_again = false;
            for _ in 0..50 {
                let mut w = Waiter::new(Spin::Adaptive, backoff, Seats::none());
                let mut polls = 0;
                let start = Instant::now();
                assert!(!w.spin(None, |_| {
                    polls += 1;
                    Poll::Working
                }));
                assert!(start.elapsed() >= phase, "the yield phase lasts {phase:?}");
                if polls > 1 {
                    looked_again = true;
                    break;
                }
            }
            assert!(looked_again, "it looks again after each yield");
        }
    }

    /// The phase is 50 µs of wall time: on a loaded machine a yield can outlast it, so the
    /// answer is looked for in up to 50 waits (a run where it ended the wait is the proof;
    /// no wait may end on any poll but the answer's).
    #[test]
    fn an_answer_during_the_yield_phase_ends_the_wait() {
        let mut answered = 0;
        for _ in 0..50 {
            let mut w = Waiter::new(Spin::Adaptive, Backoff::default(), Seats::none());
            let mut polls = 0;
            let got = w.spin(None, |_| {
                polls += 1;
                if polls == 3 {
                    Poll::Ready
                } else {
                    Poll::NotStarted
                }
            });
            if got {
                assert_eq!(polls, 3);
                answered += 1;
                break;
            }
            assert!(polls < 3, "gave up after seeing the answer ({polls} polls)");
        }
        assert_eq!(answered, 1, "no wait ended on the answer in 50 tries");
    }

    #[test]
    fn blocking_mode_looks_once_and_sleeps() {
        let mut w = Waiter::new(
            Spin::Fixed(Duration::ZERO),
            Backoff::default(),
            Seats::none(),
        );
        let mut polls = 0;
        assert!(!w.spin(None, |_| {
            polls += 1;
            Poll::Working
        }));
        assert_eq!(polls, 1, "one look, then sleep");
    }
}

#[cfg(test)]
thread_local! {
    /// A unit test's [`recheck`] period for its own thread (a lost wake-up then costs that
    /// long instead of a few milliseconds).
    pub(crate) static RECHECK_FOR_TESTS: std::cell::Cell<Option<Duration>> =
        const { std::cell::Cell::new(None) };
}

/// The period after which a sleeper re-checks its condition without having been woken
/// (`default`). With the `test-hooks` feature, `AEGIS_TEST_RECHECK_MS` replaces every such
/// period, so a test can make a lost wake-up cost that long (and fail) instead of the few
/// milliseconds a re-check normally hides it behind.
pub fn recheck(default: Duration) -> Duration {
    #[cfg(test)]
    if let Some(d) = RECHECK_FOR_TESTS.with(std::cell::Cell::get) {
        return d;
    }
    #[cfg(feature = "test-hooks")]
    {
        static OVERRIDE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
        if let Some(d) = *OVERRIDE.get_or_init(|| {
            std::env::var("AEGIS_TEST_RECHECK_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
        }) {
            return d;
        }
    }
    default
}
