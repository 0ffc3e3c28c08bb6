//! One-shot reply mailboxes: the state machine shared by a caller and an instance.
//!
//! State word ([`MailboxHeader::state`]): `generation << 8 | async << 5 | waiter << 4 |
//! phase`. `waiter`: the caller sleeps on this word's futex; `async`: an async waiter
//! sleeps on the connection's doorbell ([`crate::shm::layout::ClientControl`]).
//!
//! ```text
//!  caller: arm            instance: take           instance: complete
//!  FREE ──────▶ PENDING ───────────────▶ TAKEN ───────────────────▶ READY ──▶ (caller copies, FREE)
//!                  │ caller: cancel (deadline passed before the instance took it)
//!                  └──────▶ CANCELLED  (instance's take fails: the request is never run)
//! ```
//!
//! A reply is written only by the instance that moved the mailbox to `TAKEN` for *this*
//! generation, so a reply arriving after its call timed out lands in a mailbox whose
//! generation has moved on and is dropped, never handed to a later call. A caller whose
//! cancel finds `TAKEN` quarantines the mailbox until the instance finishes.
//!
//! SYNC POINT: the instance's Release swap to `READY` in [`complete`] pairs with the
//! caller's Acquire load in [`wait_ready`]; the caller's Release store of `FREE` in
//! [`release`] pairs with the instance's Acquire load in [`still_unread`] before it reuses
//! a heap block that carried the reply.

use std::time::{Duration, Instant};

use crate::channel::wait::{Poll, Waiter};
use crate::shm::layout::MailboxHeader;
use crate::shm::sync::{AtomicU32, Ordering};
use crate::shm::sys;

pub const FREE: u32 = 0;
pub const PENDING: u32 = 1;
pub const TAKEN: u32 = 2;
pub const READY: u32 = 3;
pub const CANCELLED: u32 = 4;
const PHASE: u32 = 0xf;
pub const WAITER: u32 = 1 << 4;
/// An async waiter (a future) waits for this mailbox: `complete` rings the doorbell.
pub const ASYNC: u32 = 1 << 5;
/// The waiter flags, kept across `take`.
const FLAGS: u32 = WAITER | ASYNC;
/// Generations are 24 bits; they only need to differ between consecutive uses.
pub const GEN_MASK: u32 = 0x00ff_ffff;

pub fn pack(gen: u32, phase: u32) -> u32 {
    (gen & GEN_MASK) << 8 | phase
}
pub fn phase(s: u32) -> u32 {
    s & PHASE
}
pub fn gen_of(s: u32) -> u32 {
    s >> 8
}

/// Caller: arms the mailbox for generation `gen` and the call's `nonce` before publishing
/// the request. Relaxed: the request's publication (Release on the ring slot) carries both
/// to the instance.
pub fn arm(mb: &MailboxHeader, gen: u32, nonce: u64) {
    mb.nonce.store(nonce, Ordering::Relaxed);
    mb.state.store(pack(gen, PENDING), Ordering::Relaxed);
}

/// Instance: claims the right to reply. Fails if the caller cancelled, the mailbox has
/// moved to another generation, or the request's `nonce` is not the armed call's (a forged
/// or stale header): then the request must not be run.
pub fn take(mb: &MailboxHeader, gen: u32, nonce: u64) -> bool {
    // Relaxed: the nonce was written before the state this generation's PENDING came with;
    // a caller re-arms only a FREE mailbox, which the CAS below then fails on.
    if mb.nonce.load(Ordering::Relaxed) != nonce {
        return false;
    }
    let mut s = mb.state.load(Ordering::Relaxed);
    if s & !FLAGS == pack(gen, PENDING) {
        mb.taker_pid.store(my_pid(), Ordering::Relaxed);
    }
    loop {
        if s & !FLAGS != pack(gen, PENDING) {
            return false;
        }
        // Exclusivity comes from the RMW order on this one word; the request data was
        // already acquired through the ring slot. SYNC POINT: Release publishes
        // `taker_pid` to a caller whose `cancel` (Acquire) then finds TAKEN.
        match mb.state.compare_exchange_weak(
            s,
            pack(gen, TAKEN) | (s & FLAGS),
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => return true,
            Err(now) => s = now,
        }
    }
}

/// Instance: publishes the reply (written before this call) and wakes the caller if it
/// sleeps: on the state word, or through the connection's `doorbell` for an async waiter.
/// Returns false if the state was not ours (a misbehaving caller changed it).
pub fn complete(mb: &MailboxHeader, gen: u32, nonce: u64, doorbell: &AtomicU32) -> bool {
    // A CAS from our own TAKEN, never a blind store: if the caller recycled the mailbox
    // (its taker presumed dead), this late reply changes nothing.
    if mb.nonce.load(Ordering::Relaxed) != nonce {
        return false;
    }
    let mut s = mb.state.load(Ordering::Relaxed);
    loop {
        if s & !FLAGS != pack(gen, TAKEN) {
            return false;
        }
        match mb.state.compare_exchange_weak(
            s,
            pack(gen, READY),
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => break,
            Err(now) => s = now,
        }
    }
    if s & WAITER != 0 {
        let _ = sys::futex_wake(&mb.state, 1);
        crate::channel::wait::woke_a_sleeper();
    }
    if s & ASYNC != 0 {
        // SYNC POINT: this Release increment pairs with the doorbell thread's Acquire load
        // before its scan: a scan that follows a ring sees the READY above.
        doorbell.fetch_add(1, Ordering::Release);
        let _ = sys::futex_wake(doorbell, 1);
    }
    true
}

/// This process's pid (cached: `getpid` is a system call).
fn my_pid() -> u32 {
    use std::sync::OnceLock;
    static PID: OnceLock<u32> = OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// Caller: the pid of the process that took the request (0 if unknown), read after a
/// `cancel` that found the request taken.
pub fn taker_pid(mb: &MailboxHeader) -> u32 {
    mb.taker_pid.load(Ordering::Relaxed)
}

/// Instance: whether the mailbox is still this call's and ours to answer (TAKEN by us for
/// `gen` with `nonce`): checked before writing a reply body into it, so a reply that is
/// late beyond the caller's patience never writes into a mailbox recycled for another call.
pub fn still_taken(mb: &MailboxHeader, gen: u32, nonce: u64) -> bool {
    mb.state.load(Ordering::Relaxed) & !FLAGS == pack(gen, TAKEN)
        && mb.nonce.load(Ordering::Relaxed) == nonce
}

/// Outcome of a caller's wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Ready,
    TimedOut,
    /// `check()` said the instance is gone.
    TargetGone,
    /// `check()` said the instance has made no progress for the stall bound.
    Stalled,
    /// `check()` said the caller was interrupted.
    Interrupted,
}

/// What a sleeping caller learns when it re-checks its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Alive,
    Gone,
    /// No progress for the stall bound while our request waits untaken.
    Stalled,
    /// The caller's interrupt check fired ([`crate::CallOptions::interrupt`]).
    Interrupted,
}

/// How often a sleeping caller re-checks that its instance still exists, so a call to an
/// instance that died returns within milliseconds rather than at its deadline.
pub const LIVENESS_CHECK: Duration = Duration::from_millis(5);

/// Caller: waits for `READY` of generation `gen`: spins and yields as `waiter` decides
/// ([`crate::channel::wait`]), then sleeps on the state word (setting the waiter bit so the instance
/// knows to wake it), re-checking the instance with `check()` every [`LIVENESS_CHECK`].
pub fn wait_ready(
    mb: &MailboxHeader,
    gen: u32,
    waiter: &mut Waiter<'_>,
    deadline: Instant,
    mut check: impl FnMut() -> Target,
) -> Wait {
    let ready = pack(gen, READY);
    let start = Instant::now();
    let poll = || {
        let s = mb.state.load(Ordering::Acquire);
        if s == ready {
            Poll::Ready
        } else if s & !FLAGS == pack(gen, PENDING) {
            Poll::NotStarted
        } else {
            Poll::Working
        }
    };
    if waiter.spin(Some(deadline), poll) {
        waiter.learn(start.elapsed(), true);
        return Wait::Ready;
    }
    waiter.parking();
    loop {
        let s = mb.state.load(Ordering::Acquire);
        if s == ready {
            waiter.learn(start.elapsed(), false);
            return Wait::Ready;
        }
        let now = Instant::now();
        if now >= deadline {
            return Wait::TimedOut;
        }
        let p = phase(s);
        if gen_of(s) != gen & GEN_MASK || (p != PENDING && p != TAKEN) {
            // Someone else's value (misbehaving peer): keep polling until the deadline.
            std::thread::yield_now();
            continue;
        }
        let armed = s | WAITER;
        if s & WAITER == 0
            && mb
                .state
                .compare_exchange(s, armed, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            continue;
        }
        match check() {
            Target::Alive => {}
            Target::Gone => return Wait::TargetGone,
            Target::Stalled => return Wait::Stalled,
            Target::Interrupted => return Wait::Interrupted,
        }
        let recheck = crate::channel::wait::recheck(LIVENESS_CHECK);
        let _ = sys::futex_wait(&mb.state, armed, Some((deadline - now).min(recheck)));
    }
}

/// What a caller whose deadline passed may do with its mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// Cancelled before the instance took it: the request will never run; reuse at once.
    Cancelled,
    /// The reply arrived after all: read it.
    Ready,
    /// The instance is running it: quarantine the mailbox until it completes.
    InProgress,
}

pub fn cancel(mb: &MailboxHeader, gen: u32) -> Cancel {
    let mut s = mb.state.load(Ordering::Acquire);
    loop {
        if s == pack(gen, READY) {
            return Cancel::Ready;
        }
        if s & !FLAGS != pack(gen, PENDING) {
            return Cancel::InProgress;
        }
        match mb.state.compare_exchange(
            s,
            pack(gen, CANCELLED),
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => return Cancel::Cancelled,
            Err(now) => s = now,
        }
    }
}

/// Whether the request of `gen` is still waiting for an instance to take it.
pub fn is_pending(mb: &MailboxHeader, gen: u32) -> bool {
    mb.state.load(Ordering::Relaxed) & !FLAGS == pack(gen, PENDING)
}

/// Async caller: flags the mailbox so that `complete` rings the doorbell. Returns false if
/// the mailbox is no longer waiting for `gen`'s reply (it is ready, or cancelled).
pub fn flag_async(mb: &MailboxHeader, gen: u32) -> bool {
    let mut s = mb.state.load(Ordering::Relaxed);
    loop {
        let p = phase(s);
        if gen_of(s) != gen & GEN_MASK || (p != PENDING && p != TAKEN) {
            return false;
        }
        if s & ASYNC != 0 {
            return true;
        }
        // Relaxed: the flag publishes nothing; `complete` reads it in its own RMW.
        match mb
            .state
            .compare_exchange_weak(s, s | ASYNC, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => return true,
            Err(now) => s = now,
        }
    }
}

/// Whether the mailbox still waits for the reply of `gen` (pending or being handled).
pub fn still_waiting(mb: &MailboxHeader, gen: u32) -> bool {
    let s = mb.state.load(Ordering::Acquire);
    let p = phase(s);
    gen_of(s) == gen & GEN_MASK && (p == PENDING || p == TAKEN)
}

/// Caller: whether a quarantined mailbox has finished (reply written, may be recycled).
pub fn is_ready(mb: &MailboxHeader, gen: u32) -> bool {
    mb.state.load(Ordering::Acquire) == pack(gen, READY)
}

/// Caller: done reading the reply of `gen`; the instance may reuse the reply's heap block.
pub fn release(mb: &MailboxHeader, gen: u32) {
    mb.state.store(pack(gen, FREE), Ordering::Release);
}

/// Instance: whether the caller still has to read the reply of `gen`.
pub fn still_unread(state: &AtomicU32, gen: u32) -> bool {
    state.load(Ordering::Acquire) == pack(gen, READY)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn mb() -> Box<MailboxHeader> {
        // SAFETY: all-atomic struct; zero is FREE of generation 0.
        unsafe { Box::new(std::mem::zeroed()) }
    }

    #[test]
    fn the_flags_are_two_single_bits_between_the_phase_and_the_generation() {
        for f in [WAITER, ASYNC] {
            assert_eq!(f.count_ones(), 1, "{f:#x}");
            assert_eq!(f & PHASE, 0, "{f:#x} overlaps the phase");
            assert!(f < 1 << 8, "{f:#x} overlaps the generation");
        }
        assert_ne!(WAITER, ASYNC);
        assert_eq!(FLAGS, WAITER | ASYNC);
        for p in [FREE, PENDING, TAKEN, READY, CANCELLED] {
            assert_eq!(p & !PHASE, 0);
            assert_eq!(phase(pack(GEN_MASK, p) | FLAGS), p);
            assert_eq!(gen_of(pack(GEN_MASK, p)), GEN_MASK);
        }
    }

    #[test]
    fn late_reply_after_cancel_is_refused() {
        let m = mb();
        arm(&m, 1, 11);
        assert_eq!(cancel(&m, 1), Cancel::Cancelled);
        assert!(!take(&m, 1, 11), "a cancelled request must not run");
        arm(&m, 2, 22);
        assert!(
            !take(&m, 1, 11),
            "a stale generation must not take the next call's mailbox"
        );
        assert!(!take(&m, 2, 11), "a forged nonce must not take the mailbox");
        assert!(take(&m, 2, 22));
        assert!(still_taken(&m, 2, 22) && !still_taken(&m, 2, 11));
    }

    #[test]
    fn cancel_while_taken_reports_in_progress_then_ready() {
        let m = mb();
        arm(&m, 5, 55);
        assert!(take(&m, 5, 55));
        assert_eq!(cancel(&m, 5), Cancel::InProgress);
        assert!(complete(&m, 5, 55, &AtomicU32::new(0)));
        assert!(is_ready(&m, 5));
        assert_eq!(cancel(&m, 5), Cancel::Ready);
    }

    /// The waiter flags ride along every transition and never change what the state
    /// predicates answer (found by cargo-mutants: the masking went unchecked).
    #[test]
    fn the_waiter_flags_change_no_predicate_and_survive_take_and_are_rung_by_complete() {
        for flags in [0, WAITER, ASYNC, WAITER | ASYNC] {
            let m = mb();
            arm(&m, 3, 33);
            m.state.fetch_or(flags & WAITER, Ordering::Relaxed);
            if flags & ASYNC != 0 {
                assert!(flag_async(&m, 3));
                assert!(flag_async(&m, 3), "flagging twice is fine");
            }
            assert!(!flag_async(&m, 4), "another generation");
            assert!(is_pending(&m, 3) && !is_pending(&m, 4), "{flags:#x}");
            assert!(still_waiting(&m, 3) && !still_waiting(&m, 4));
            assert!(!is_ready(&m, 3));
            assert!(take(&m, 3, 33), "flags {flags:#x} do not stop a take");
            assert_eq!(
                m.state.load(Ordering::Relaxed) & FLAGS,
                flags,
                "kept across take"
            );
            assert_eq!(taker_pid(&m), std::process::id());
            assert!(!is_pending(&m, 3) && still_waiting(&m, 3));
            let bell = AtomicU32::new(0);
            assert!(complete(&m, 3, 33, &bell));
            assert_eq!(bell.load(Ordering::Relaxed), u32::from(flags & ASYNC != 0));
            assert!(!still_waiting(&m, 3));
            assert!(!flag_async(&m, 3), "ready: nothing to flag");
            assert!(!complete(&m, 3, 33, &bell), "completed once");
            // The caller reads the reply, then frees it.
            release(&m, 3);
            assert!(!still_unread(&m.state, 3));
        }
        // A reply not yet read is unread; a freed one is not.
        let m = mb();
        arm(&m, 7, 77);
        assert!(take(&m, 7, 77) && complete(&m, 7, 77, &AtomicU32::new(0)));
        assert!(still_unread(&m.state, 7) && is_ready(&m, 7));
        assert!(!still_unread(&m.state, 8));
        assert_eq!(phase(pack(7, READY)), READY);
        assert_eq!(gen_of(pack(7, READY)), 7);
    }

    #[test]
    fn sleeping_caller_is_woken_by_reply() {
        let m: &'static MailboxHeader = Box::leak(mb());
        arm(m, 9, 99);
        let t = std::thread::spawn(move || {
            let mut w = Waiter::new(
                crate::channel::wait::Spin::Fixed(Duration::ZERO),
                Default::default(),
                crate::channel::wait::Seats::none(),
            );
            wait_ready(
                m,
                9,
                &mut w,
                Instant::now() + Duration::from_secs(10),
                || Target::Alive,
            )
        });
        // Wait until the caller has announced that it sleeps, then reply.
        while m.state.load(Ordering::Relaxed) & WAITER == 0 {
            std::thread::yield_now();
        }
        assert!(take(m, 9, 99));
        assert!(complete(m, 9, 99, &AtomicU32::new(0)));
        assert_eq!(t.join().unwrap(), Wait::Ready);
    }

    /// The caller's sleep re-checks only every 30 s here: the reply's futex wake, not a
    /// re-check, must end it (a lost wake-up fails this instead of costing 5 ms).
    #[test]
    fn a_reply_wakes_its_sleeping_caller_without_a_recheck() {
        let m: &'static MailboxHeader = Box::leak(mb());
        arm(m, 4, 44);
        assert!(take(m, 4, 44));
        let t = std::thread::spawn(move || {
            crate::channel::wait::RECHECK_FOR_TESTS.set(Some(Duration::from_secs(30)));
            let mut w = Waiter::new(
                crate::channel::wait::Spin::Fixed(Duration::ZERO),
                Default::default(),
                crate::channel::wait::Seats::none(),
            );
            let start = Instant::now();
            let r = wait_ready(m, 4, &mut w, start + Duration::from_secs(60), || {
                Target::Alive
            });
            (r, start.elapsed())
        });
        let end = Instant::now() + Duration::from_secs(10);
        while m.state.load(Ordering::Relaxed) & WAITER == 0 {
            assert!(Instant::now() < end, "the caller never went to sleep");
            std::thread::yield_now();
        }
        assert!(complete(m, 4, 44, &AtomicU32::new(0)));
        let (r, waited) = t.join().unwrap();
        assert_eq!(r, Wait::Ready);
        assert!(
            waited < Duration::from_secs(10),
            "woken only by a re-check: {waited:?}"
        );
    }

    /// A caller waiting for a request the instance is running sleeps: 300 ms of waiting
    /// costs its thread a few milliseconds of CPU, not 300 (a loop that polls instead of
    /// sleeping on the futex, or a futex wait on a value the word no longer has, fails it).
    #[test]
    fn a_caller_waiting_for_a_running_request_sleeps() {
        let m = mb();
        arm(&m, 6, 66);
        assert!(take(&m, 6, 66));
        let mut w = Waiter::new(
            crate::channel::wait::Spin::Fixed(Duration::ZERO),
            Default::default(),
            crate::channel::wait::Seats::none(),
        );
        let cpu = || {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes one timespec we own.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        };
        let before = cpu();
        let r = wait_ready(
            &m,
            6,
            &mut w,
            Instant::now() + Duration::from_millis(300),
            || Target::Alive,
        );
        let used = cpu() - before;
        assert_eq!(r, Wait::TimedOut);
        assert!(
            used < Duration::from_millis(100),
            "{used:?} of CPU while waiting 300 ms"
        );
    }
}

/// Model check of the cancel/take race: exactly one side wins, and a reply is published
/// only by a winning instance.
#[cfg(loom)]
mod loom_tests {
    use super::*;
    use crate::shm::sync::{AtomicU32, AtomicU64};
    use loom::sync::Arc;

    fn mailbox() -> MailboxHeader {
        MailboxHeader {
            state: AtomicU32::new(0),
            status: AtomicU32::new(0),
            instance: AtomicU32::new(0),
            reply_kind: AtomicU32::new(0),
            reply_len: AtomicU64::new(0),
            heap_off: AtomicU64::new(0),
            incarnation: AtomicU64::new(0),
            nonce: AtomicU64::new(0),
            taker_pid: AtomicU32::new(0),
            _pad: 0,
        }
    }

    #[test]
    fn cancel_and_take_never_both_win() {
        loom::model(|| {
            let mb = Arc::new(mailbox());
            arm(&mb, 3, 33);
            let inst = {
                let mb = mb.clone();
                loom::thread::spawn(move || {
                    if take(&mb, 3, 33) {
                        mb.reply_len.store(42, Ordering::Relaxed);
                        assert!(complete(&mb, 3, 33, &AtomicU32::new(0)));
                        true
                    } else {
                        false
                    }
                })
            };
            let c = cancel(&mb, 3);
            let took = inst.join().unwrap();
            match c {
                Cancel::Cancelled => assert!(!took),
                Cancel::InProgress | Cancel::Ready => {
                    assert!(took);
                    let s = mb.state.load(Ordering::Acquire);
                    assert_eq!(s, pack(3, READY));
                    assert_eq!(mb.reply_len.load(Ordering::Relaxed), 42);
                }
            }
        });
    }

    /// The waiter-bit handshake: a caller that goes to sleep on the state word is woken by
    /// the reply, in every interleaving, with the futex model that never times out (see
    /// `sys::futex_model`): a lost wake is a deadlock loom reports. The reply's bytes go
    /// through a loom cell, so reading them is checked to happen after their writing.
    #[test]
    fn a_sleeping_caller_is_always_woken_and_sees_the_reply() {
        use crate::channel::wait::{Seats, Spin, Waiter};
        use std::time::{Duration, Instant};
        loom::model(|| {
            let mb = Arc::new(mailbox());
            let body = Arc::new(loom::cell::UnsafeCell::new(0u64));
            arm(&mb, 3, 33);
            let inst = {
                let (mb, body) = (mb.clone(), body.clone());
                loom::thread::spawn(move || {
                    assert!(take(&mb, 3, 33));
                    // SAFETY: the mailbox is TAKEN by this thread: it alone writes the body.
                    body.with_mut(|p| unsafe { *p = 42 });
                    assert!(complete(&mb, 3, 33, &AtomicU32::new(0)));
                })
            };
            let mut w = Waiter::new(
                Spin::Fixed(Duration::ZERO),
                Default::default(),
                Seats::none(),
            );
            let r = wait_ready(
                &mb,
                3,
                &mut w,
                Instant::now() + Duration::from_secs(3600),
                || Target::Alive,
            );
            assert_eq!(r, Wait::Ready);
            // SAFETY: READY was acquired: the instance's writes are done.
            assert_eq!(body.with(|p| unsafe { *p }), 42);
            inst.join().unwrap();
        });
    }
}
