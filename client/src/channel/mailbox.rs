//! One-shot reply mailboxes: the state machine shared by a caller and an instance.
//!
//! A mailbox has three words with one writer each, in the two sides of a channel
//! ([`crate::shm::layout::ChannelSeg`]):
//!
//! * the caller's **call** word ([`CallWord`], request side: `generation << 8 | async << 5
//!   | waiter << 4 | phase`, and the call's nonce);
//! * the instance's **taken** word ([`TakenWord`], reply side: `generation << 8 | phase`,
//!   and the taker's pid);
//! * the instance's **answer** word ([`MailboxHeader::state`], reply side: `generation << 8
//!   | READY`, with the reply beside it).
//!
//! ```text
//!  call   (caller):    FREE ──arm──▶ PENDING ──cancel──▶ CANCELLED    (FREE again: a heap reply read)
//!  taken  (instance):  (an older generation) ──take──▶ TAKEN ──complete──▶ DONE
//!                                                          └─(saw the cancel)─▶ DECLINED
//!  answer (instance):  (an older generation) ──complete──▶ READY
//! ```
//!
//! The take has a word of its own, apart from the answer: a spinning caller polls only the
//! answer's line, and during a call only the reply is written to it. (With the take in
//! the answer word as well, that line travelled to the instance's core and back once more
//! per call: about 0.06 µs of a 1.3 µs spinning round trip here.) The caller reads the
//! taken word only when a call outlasts its spin's grace, or is cancelled.
//!
//! Every word carries the generation, so a reply arriving after its call timed out lands
//! in a mailbox whose generation has moved on and is never handed to a later call; and a
//! take needs the call word armed for the request's generation with its nonce, so a
//! stale or forged header is never run.
//!
//! Take and cancel race as a Dekker pair: the instance stores `TAKEN(gen)`, a SeqCst fence,
//! then re-reads the call word; the caller stores `CANCELLED(gen)`, a SeqCst fence, then
//! re-reads the taken and answer words. At least one sees the other's store: an instance
//! that sees the cancel declines (`DECLINED`) and never runs the request; a caller that
//! sees the take quarantines the mailbox until `READY` or `DECLINED`. A caller that saw
//! neither knows the request will never run. The waiter flags are the same pair the other
//! way round: the caller sets `WAITER` (or `ASYNC`) in its call word, fence, re-reads the
//! answer and sleeps on the answer word (a futex on a read-only mapping: `FUTEX_WAIT` needs
//! only read access); the instance stores `READY`, fence, reads the call word, wakes.
//!
//! SYNC POINT: the instance's Release store of `READY` in [`complete`] pairs with the
//! caller's Acquire loads of the answer in [`wait_ready`], [`cancel`] and [`is_ready`]; the
//! instance's Release CAS to `TAKEN` in [`take`] pairs with the Acquire loads of the taken
//! word in [`cancel`] (the taker's pid) and in the next [`take`]; the caller's Release
//! store of `FREE` in [`release`] pairs with the instance's Acquire load in
//! [`still_unread`] before it reuses a heap block that carried the reply; the SeqCst fences
//! pair as the two Dekker pairs above.

use std::time::{Duration, Instant};

use crate::channel::wait::{Limit, Poll, Waiter};
use crate::shm::layout::{Mb, PAYLOAD_INLINE};
use crate::shm::sync::{fence, Ordering};
use crate::shm::sys;

/// Call word phases (the caller's).
pub const FREE: u32 = 0;
pub const PENDING: u32 = 1;
pub const CANCELLED: u32 = 4;
/// Taken word phases (the instance's; 0 is "nothing for any generation yet").
pub const TAKEN: u32 = 2;
/// The instance took the request, then saw the caller's cancel: it never runs it.
pub const DECLINED: u32 = 5;
/// The instance published the reply (the answer word says `READY`).
pub const DONE: u32 = 6;
/// The answer word's phase (the instance's).
pub const READY: u32 = 3;
const PHASE: u32 = 0xf;
/// The caller sleeps on the answer word's futex.
pub const WAITER: u32 = 1 << 4;
/// An async waiter (a future, an event fd) waits for this mailbox: its connection's
/// doorbell thread sleeps on the answer word, and `complete` wakes it there.
pub const ASYNC: u32 = 1 << 5;
/// The waiter flags of the call word.
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

/// Whether taken word `t` is about generation `gen` already (taken, done or declined).
fn answered(t: u32, gen: u32) -> bool {
    gen_of(t) == gen & GEN_MASK && phase(t) != FREE
}

/// Whether call word `c` is armed for generation `gen` and not cancelled.
fn armed(c: u32, gen: u32) -> bool {
    c & !FLAGS == pack(gen, PENDING)
}

/// Whether generation `gen`'s call has ended: replied, or declined after the caller's
/// cancel.
fn finished(mb: Mb<'_>, gen: u32) -> bool {
    mb.ans.state.load(Ordering::Acquire) == pack(gen, READY)
        || mb.taken.state.load(Ordering::Acquire) == pack(gen, DECLINED)
}

/// Caller: arms the mailbox for generation `gen` and the call's `nonce` before publishing
/// the request. Relaxed: the request's publication (Release on the ring slot) carries both
/// to the instance.
pub fn arm(mb: Mb<'_>, gen: u32, nonce: u64) {
    mb.call.nonce.store(nonce, Ordering::Relaxed);
    mb.call.state.store(pack(gen, PENDING), Ordering::Relaxed);
}

/// Instance: claims the right to reply. Fails if the caller cancelled, or the mailbox has
/// moved past `gen` (a stale request), or `gen` was taken already (a second copy), or the
/// request's `nonce` is not the armed call's (a forged header): then the request must not
/// be run.
pub fn take(mb: Mb<'_>, gen: u32, nonce: u64) -> bool {
    // Relaxed: the nonce came with the request's publication.
    if mb.call.nonce.load(Ordering::Relaxed) != nonce {
        return false;
    }
    // Bounded: only this instance's threads write the taken word, and a CAS fails only
    // when another of them took a generation meanwhile.
    for _ in 0..64 {
        // Acquire: a take of a later generation (another thread took the mailbox's next
        // call) makes the call word's later generation visible below, so a stale
        // PENDING(gen) is never read after it.
        let t = mb.taken.state.load(Ordering::Acquire);
        if answered(t, gen) || !armed(mb.call.state.load(Ordering::Relaxed), gen) {
            return false;
        }
        mb.taken.taker_pid.store(my_pid(), Ordering::Relaxed);
        // SYNC POINT: Release publishes `taker_pid` to a caller whose `cancel` (Acquire)
        // then finds TAKEN.
        if mb
            .taken
            .state
            .compare_exchange(t, pack(gen, TAKEN), Ordering::Release, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // Dekker with `cancel`: TAKEN, this fence, then the re-read of the call word.
        fence(Ordering::SeqCst);
        if armed(mb.call.state.load(Ordering::Relaxed), gen) {
            return true;
        }
        // The caller cancelled meanwhile and may not have seen our TAKEN: never run it.
        let _ = mb.taken.state.compare_exchange(
            pack(gen, TAKEN),
            pack(gen, DECLINED),
            Ordering::Release,
            Ordering::Relaxed,
        );
        return false;
    }
    false
}

/// Instance: publishes the reply (written before this call) and wakes whoever sleeps on
/// the answer word: a caller's thread (`WAITER`), or its connection's doorbell thread,
/// which sleeps on the answer words of its async waiters' mailboxes (`ASYNC`). Returns
/// false if the mailbox was not TAKEN for `gen` by this instance.
pub fn complete(mb: Mb<'_>, gen: u32) -> bool {
    // A CAS, not a store: only our own take is moved on. (A take of the mailbox's next
    // call follows its caller's seeing READY below, so in the protocol none can come in
    // between; a reply too late for a recycled mailbox then fails here instead of
    // overwriting that take.) Before READY, so that take finds DONE, not our TAKEN: the
    // Release below orders it first.
    if mb
        .taken
        .state
        .compare_exchange(
            pack(gen, TAKEN),
            pack(gen, DONE),
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
        .is_err()
    {
        return false;
    }
    mb.ans.state.store(pack(gen, READY), Ordering::Release);
    // Dekker with the caller's flags: READY, this fence, then the read of the flags.
    fence(Ordering::SeqCst);
    let c = mb.call.state.load(Ordering::Relaxed);
    if gen_of(c) != gen & GEN_MASK {
        return true;
    }
    // Both flags: a thread of the caller and its doorbell thread may both sleep here.
    let sleepers = (c & WAITER != 0) as u32 + (c & ASYNC != 0) as u32;
    if sleepers > 0 {
        let _ = sys::futex_wake(&mb.ans.state, sleepers);
    }
    if c & WAITER != 0 {
        crate::channel::wait::woke_a_sleeper();
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
pub fn taker_pid(mb: Mb<'_>) -> u32 {
    mb.taken.taker_pid.load(Ordering::Relaxed)
}

/// Instance: whether the mailbox is still this call's and ours to answer (TAKEN by us for
/// `gen`, the caller's call word still of `gen` with `nonce`): checked before writing a
/// reply body into it.
pub fn still_taken(mb: Mb<'_>, gen: u32, nonce: u64) -> bool {
    mb.taken.state.load(Ordering::Relaxed) == pack(gen, TAKEN)
        && gen_of(mb.call.state.load(Ordering::Relaxed)) == gen & GEN_MASK
        && mb.call.nonce.load(Ordering::Relaxed) == nonce
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
/// ([`crate::channel::wait`]), then sleeps on the answer word (with `WAITER` set in the
/// call word so the instance knows to wake it), re-checking the instance with `check()`
/// every [`LIVENESS_CHECK`].
pub fn wait_ready(
    mb: Mb<'_>,
    gen: u32,
    waiter: &mut Waiter<'_>,
    deadline: Instant,
    mut check: impl FnMut() -> Target,
) -> Wait {
    let ready = pack(gen, READY);
    // The taken word is read only when the waiter asks whether the instance has started
    // (a wait past its grace): a spinning caller reads no line but the answer's.
    let poll = |deep: bool| {
        if mb.ans.state.load(Ordering::Acquire) == ready {
            Poll::Ready
        } else if !deep || answered(mb.taken.state.load(Ordering::Relaxed), gen) {
            Poll::Working
        } else {
            Poll::NotStarted
        }
    };
    if waiter.spin(Some(Limit::At(deadline)), poll) {
        waiter.learn(true);
        return Wait::Ready;
    }
    waiter.started();
    waiter.parking();
    // Relaxed: the fence below orders it before the re-read of the answer.
    mb.call.state.fetch_or(WAITER, Ordering::Relaxed);
    loop {
        // Dekker with `complete`: WAITER, this fence, then the re-read of the answer.
        fence(Ordering::SeqCst);
        let a = mb.ans.state.load(Ordering::Acquire);
        if a == ready {
            waiter.learn(false);
            return Wait::Ready;
        }
        let now = Instant::now();
        if now >= deadline {
            return Wait::TimedOut;
        }
        match check() {
            Target::Alive => {}
            Target::Gone => return Wait::TargetGone,
            Target::Stalled => return Wait::Stalled,
            Target::Interrupted => return Wait::Interrupted,
        }
        let recheck = crate::channel::wait::recheck(LIVENESS_CHECK);
        // An answer word its instance keeps changing only ends this sleep early: the loop
        // runs until the deadline like any other.
        let _ = sys::futex_wait(&mb.ans.state, a, Some((deadline - now).min(recheck)));
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

pub fn cancel(mb: Mb<'_>, gen: u32) -> Cancel {
    let verdict = || {
        if mb.ans.state.load(Ordering::Acquire) == pack(gen, READY) {
            return Some(Cancel::Ready);
        }
        let t = mb.taken.state.load(Ordering::Acquire);
        if t == pack(gen, TAKEN) || t == pack(gen, DONE) {
            // DONE: READY follows.
            Some(Cancel::InProgress)
        } else if t == pack(gen, DECLINED) {
            Some(Cancel::Cancelled)
        } else {
            None
        }
    };
    if let Some(v) = verdict() {
        return v;
    }
    mb.call.state.store(pack(gen, CANCELLED), Ordering::Relaxed);
    // Dekker with `take`: CANCELLED, this fence, then the re-read of the taken word.
    fence(Ordering::SeqCst);
    verdict().unwrap_or(Cancel::Cancelled)
}

/// Whether the request of `gen` is still waiting for an instance to take it.
pub fn is_pending(mb: Mb<'_>, gen: u32) -> bool {
    !answered(mb.taken.state.load(Ordering::Relaxed), gen)
        && armed(mb.call.state.load(Ordering::Relaxed), gen)
}

/// Async caller: flags the mailbox so that `complete` wakes the answer word. Returns false if
/// the mailbox is no longer waiting for `gen`'s reply (it is ready, declined, or
/// cancelled).
pub fn flag_async(mb: Mb<'_>, gen: u32) -> bool {
    if !armed(mb.call.state.load(Ordering::Relaxed), gen) {
        return false;
    }
    // Relaxed: the fence below orders it before the re-read of the answer.
    mb.call.state.fetch_or(ASYNC, Ordering::Relaxed);
    // Dekker with `complete`: ASYNC, this fence, then the re-read of the answer.
    fence(Ordering::SeqCst);
    !finished(mb, gen)
}

/// Whether the mailbox still waits for the reply of `gen` (pending or being handled).
pub fn still_waiting(mb: Mb<'_>, gen: u32) -> bool {
    armed(mb.call.state.load(Ordering::Relaxed), gen) && !finished(mb, gen)
}

/// Caller: whether the reply of `gen` is there to read.
pub fn is_ready(mb: Mb<'_>, gen: u32) -> bool {
    mb.ans.state.load(Ordering::Acquire) == pack(gen, READY)
}

/// Caller: whether a quarantined mailbox has finished (reply written, or the request
/// declined after the cancel): it may be recycled.
pub fn is_finished(mb: Mb<'_>, gen: u32) -> bool {
    finished(mb, gen)
}

/// Caller: done with the call of `gen` (its reply read, or none to come). Only a reply in
/// a heap block has anything to give back: then the caller stores `FREE`, and the instance
/// may reuse the block. For an inline reply the next call's `arm` is soon enough.
pub fn release(mb: Mb<'_>, gen: u32) {
    if is_ready(mb, gen) && mb.ans.reply_kind.load(Ordering::Relaxed) != PAYLOAD_INLINE as u32 {
        mb.call.state.store(pack(gen, FREE), Ordering::Release);
    }
}

/// Instance: whether the caller still has to read the reply of `gen` (it is ready and the
/// caller has neither released the mailbox nor moved it on).
pub fn still_unread(mb: Mb<'_>, gen: u32) -> bool {
    let c = mb.call.state.load(Ordering::Acquire) & !FLAGS;
    mb.ans.state.load(Ordering::Relaxed) == pack(gen, READY)
        && (c == pack(gen, PENDING) || c == pack(gen, CANCELLED))
}

/// A mailbox's three words, as the two sides of a channel hold them (for the tests and
/// the loom models).
#[cfg(test)]
struct Pair {
    call: crate::shm::layout::CallWord,
    taken: crate::shm::layout::TakenWord,
    ans: crate::shm::layout::MailboxHeader,
}

#[cfg(test)]
impl Pair {
    fn mb(&self) -> Mb<'_> {
        Mb {
            call: &self.call,
            taken: &self.taken,
            ans: &self.ans,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn mb() -> Box<Pair> {
        // SAFETY: all-atomic structs; zero is FREE of generation 0, nothing answered.
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
        for p in [FREE, PENDING, TAKEN, READY, CANCELLED, DECLINED, DONE] {
            assert_eq!(p & !PHASE, 0);
            assert_eq!(phase(pack(GEN_MASK, p) | FLAGS), p);
            assert_eq!(gen_of(pack(GEN_MASK, p)), GEN_MASK);
        }
    }

    #[test]
    fn late_reply_after_cancel_is_refused() {
        let m = mb();
        arm(m.mb(), 1, 11);
        assert_eq!(cancel(m.mb(), 1), Cancel::Cancelled);
        assert!(!take(m.mb(), 1, 11), "a cancelled request must not run");
        // The caller reuses the mailbox for generation 2 at once.
        arm(m.mb(), 2, 22);
        assert!(
            !take(m.mb(), 2, 11),
            "a forged nonce must not take the mailbox"
        );
        assert!(take(m.mb(), 2, 22));
        assert!(
            !take(m.mb(), 1, 11),
            "a stale generation must not take the next call's mailbox"
        );
        assert_eq!(m.taken.state.load(Ordering::Relaxed), pack(2, TAKEN));
        assert!(still_taken(m.mb(), 2, 22) && !still_taken(m.mb(), 1, 11));
        assert!(!still_taken(m.mb(), 2, 11));
    }

    /// A take refuses a generation its mailbox has moved past: the caller armed a later
    /// call (and sleeps for its reply), or another serving thread took a later call.
    #[test]
    fn a_take_refuses_a_generation_the_mailbox_has_moved_past() {
        let m = mb();
        arm(m.mb(), 5, 55);
        m.call.state.fetch_or(WAITER, Ordering::Relaxed);
        assert!(!take(m.mb(), 4, 55), "the caller waits for generation 5");
        assert_eq!(m.taken.state.load(Ordering::Relaxed), 0, "nothing written");
        assert!(take(m.mb(), 5, 55));
        let m = mb();
        arm(m.mb(), 7, 77);
        assert!(take(m.mb(), 7, 77));
        assert!(!take(m.mb(), 6, 77), "another thread took generation 7");
        assert_eq!(
            m.taken.state.load(Ordering::Relaxed),
            pack(7, TAKEN),
            "the later take left alone"
        );
        assert!(!still_taken(m.mb(), 6, 77) && still_taken(m.mb(), 7, 77));
    }

    #[test]
    fn cancel_while_taken_reports_in_progress_then_ready() {
        let m = mb();
        arm(m.mb(), 5, 55);
        assert!(take(m.mb(), 5, 55));
        assert_eq!(cancel(m.mb(), 5), Cancel::InProgress);
        assert!(
            still_taken(m.mb(), 5, 55),
            "the caller quarantines the mailbox until the reply: it is still ours to answer"
        );
        assert!(complete(m.mb(), 5));
        assert!(is_ready(m.mb(), 5));
        assert_eq!(cancel(m.mb(), 5), Cancel::Ready);
    }

    /// The caller frees a heap reply's block by its release (the instance may reuse it
    /// then); an inline reply's release writes nothing (the next call's `arm` moves the
    /// word on, and no block waits for it).
    #[test]
    fn only_a_heap_reply_s_release_writes_the_call_word() {
        let m = mb();
        for gen in 1..=3 {
            arm(m.mb(), gen, gen as u64 * 11);
            assert!(is_pending(m.mb(), gen));
            assert!(take(m.mb(), gen, gen as u64 * 11) && complete(m.mb(), gen));
            assert!(is_ready(m.mb(), gen) && !is_pending(m.mb(), gen));
            release(m.mb(), gen);
            assert_eq!(m.call.state.load(Ordering::Relaxed), pack(gen, PENDING));
        }
        arm(m.mb(), 4, 44);
        assert!(take(m.mb(), 4, 44) && complete(m.mb(), 4));
        m.ans.reply_kind.store(
            crate::shm::layout::PAYLOAD_CHANNEL_HEAP as u32,
            Ordering::Relaxed,
        );
        assert!(still_unread(m.mb(), 4), "a heap reply not yet read");
        release(m.mb(), 4);
        assert_eq!(m.call.state.load(Ordering::Relaxed), pack(4, FREE));
        assert!(!still_unread(m.mb(), 4), "read and released");
        arm(m.mb(), 5, 55);
        assert!(take(m.mb(), 5, 55) && complete(m.mb(), 5));
        arm(m.mb(), 6, 66);
        assert!(
            !still_unread(m.mb(), 5),
            "its caller has moved on to the next call"
        );
    }

    /// The waiter flags ride along every transition and never change what the state
    /// predicates answer (found by cargo-mutants: the masking went unchecked).
    #[test]
    fn the_waiter_flags_change_no_predicate_and_survive_take_and_are_rung_by_complete() {
        for flags in [0, WAITER, ASYNC, WAITER | ASYNC] {
            let m = mb();
            arm(m.mb(), 3, 33);
            m.call.state.fetch_or(flags & WAITER, Ordering::Relaxed);
            if flags & ASYNC != 0 {
                assert!(flag_async(m.mb(), 3));
                assert!(flag_async(m.mb(), 3), "flagging twice is fine");
            }
            assert!(!flag_async(m.mb(), 4), "another generation");
            assert!(
                is_pending(m.mb(), 3) && !is_pending(m.mb(), 4),
                "{flags:#x}"
            );
            assert!(still_waiting(m.mb(), 3) && !still_waiting(m.mb(), 4));
            assert!(!is_ready(m.mb(), 3));
            assert!(take(m.mb(), 3, 33), "flags {flags:#x} do not stop a take");
            assert_eq!(
                m.call.state.load(Ordering::Relaxed) & FLAGS,
                flags,
                "kept across take"
            );
            assert_eq!(taker_pid(m.mb()), std::process::id());
            assert!(!is_pending(m.mb(), 3) && still_waiting(m.mb(), 3));
            assert!(complete(m.mb(), 3));
            assert!(!still_waiting(m.mb(), 3));
            assert!(!flag_async(m.mb(), 3), "ready: nothing to flag");
            assert!(!complete(m.mb(), 3), "completed once");
            assert!(still_unread(m.mb(), 3) && is_ready(m.mb(), 3));
            assert!(!still_unread(m.mb(), 8));
        }
        // A cancelled call has nothing to flag.
        let m = mb();
        arm(m.mb(), 2, 22);
        assert_eq!(cancel(m.mb(), 2), Cancel::Cancelled);
        assert!(!flag_async(m.mb(), 2) && !still_waiting(m.mb(), 2));
        assert!(!is_pending(m.mb(), 2));
        assert_eq!(phase(pack(7, READY)), READY);
        assert_eq!(gen_of(pack(7, READY)), 7);
    }

    #[test]
    fn sleeping_caller_is_woken_by_reply() {
        let m: &'static Pair = Box::leak(mb());
        arm(m.mb(), 9, 99);
        let t = std::thread::spawn(move || {
            let mut w = Waiter::new(
                crate::channel::wait::Spin::Fixed(Duration::ZERO),
                Default::default(),
                crate::channel::wait::Seats::none(),
            );
            wait_ready(
                m.mb(),
                9,
                &mut w,
                Instant::now() + Duration::from_secs(10),
                || Target::Alive,
            )
        });
        // Wait until the caller has announced that it sleeps, then reply.
        while m.call.state.load(Ordering::Relaxed) & WAITER == 0 {
            std::thread::yield_now();
        }
        assert!(take(m.mb(), 9, 99));
        assert!(complete(m.mb(), 9));
        assert_eq!(t.join().unwrap(), Wait::Ready);
    }

    /// Whether thread `tid` of this process is asleep (state `S` in its `stat`).
    fn sleeping(tid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"));
        // The state follows the parenthesised command name.
        stat.ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('S')))
            .unwrap_or(false)
    }

    /// A mailbox serves one generation after another: the next call's take succeeds once
    /// the last was answered and released, and a generation is taken once only (a second
    /// copy of a request, which only its own caller could publish, is not run twice).
    #[test]
    fn a_mailbox_is_taken_once_per_generation_and_again_for_the_next() {
        let m = mb();
        for gen in 1..=3 {
            arm(m.mb(), gen, gen as u64 * 11);
            assert!(take(m.mb(), gen, gen as u64 * 11), "generation {gen}");
            assert!(
                !take(m.mb(), gen, gen as u64 * 11),
                "generation {gen} taken twice"
            );
            assert!(complete(m.mb(), gen));
            assert!(is_ready(m.mb(), gen) && is_finished(m.mb(), gen));
            release(m.mb(), gen);
        }
    }

    /// The caller's sleep re-checks only every 30 s here: the reply's futex wake, not a
    /// re-check, must end it (a lost wake-up fails this instead of costing 5 ms).
    #[test]
    fn a_reply_wakes_its_sleeping_caller_without_a_recheck() {
        let m: &'static Pair = Box::leak(mb());
        arm(m.mb(), 4, 44);
        assert!(take(m.mb(), 4, 44));
        let tid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
        let t = std::thread::spawn({
            let tid = tid.clone();
            move || {
                crate::channel::wait::RECHECK_FOR_TESTS.set(Some(Duration::from_secs(30)));
                // SAFETY: gettid has no preconditions.
                tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                let mut w = Waiter::new(
                    crate::channel::wait::Spin::Fixed(Duration::ZERO),
                    Default::default(),
                    crate::channel::wait::Seats::none(),
                );
                let start = Instant::now();
                let r = wait_ready(m.mb(), 4, &mut w, start + Duration::from_secs(60), || {
                    Target::Alive
                });
                (r, start.elapsed())
            }
        });
        // Asleep in the kernel, not merely flagged: a reply before the futex wait would
        // end it without a wake (the word changed), and a missing wake would pass unseen.
        let end = Instant::now() + Duration::from_secs(10);
        while m.call.state.load(Ordering::Relaxed) & WAITER == 0
            || !sleeping(tid.load(Ordering::Relaxed))
        {
            assert!(Instant::now() < end, "the caller never went to sleep");
            std::thread::yield_now();
        }
        assert!(complete(m.mb(), 4));
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
        arm(m.mb(), 6, 66);
        assert!(take(m.mb(), 6, 66));
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
            m.mb(),
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
    use crate::shm::layout::{CallWord, MailboxHeader};

    use crate::shm::sync::{AtomicU32, AtomicU64};
    use loom::sync::Arc;

    fn mailbox() -> Pair {
        Pair {
            call: CallWord::new(),
            ans: MailboxHeader {
                state: AtomicU32::new(0),
                status: AtomicU32::new(0),
                instance: AtomicU32::new(0),
                reply_kind: AtomicU32::new(0),
                reply_len: AtomicU64::new(0),
                heap_off: AtomicU64::new(0),
                incarnation: AtomicU64::new(0),
                _pad: [0; 4],
            },
            taken: crate::shm::layout::TakenWord::new(),
        }
    }

    /// A serving thread that takes the call of `gen` (armed with `nonce`) and answers it:
    /// true if it answered.
    fn answering(mb: &Arc<Pair>, (gen, nonce): (u32, u64)) -> loom::thread::JoinHandle<bool> {
        let mb = mb.clone();
        loom::thread::spawn(move || take(mb.mb(), gen, nonce) && complete(mb.mb(), gen))
    }

    /// The take/cancel Dekker pair: a caller told `Cancelled` never sees the request run;
    /// one told `InProgress` or `Ready` sees the reply once its mailbox finishes, and a
    /// request the instance declined after the caller saw it taken finishes as declined.
    #[test]
    fn cancel_and_take_never_both_win() {
        loom::model(|| {
            let mb = Arc::new(mailbox());
            arm(mb.mb(), 3, 33);
            let inst = {
                let mb = mb.clone();
                loom::thread::spawn(move || {
                    if take(mb.mb(), 3, 33) {
                        mb.ans.reply_len.store(42, Ordering::Relaxed);
                        assert!(complete(mb.mb(), 3));
                        true
                    } else {
                        false
                    }
                })
            };
            let c = cancel(mb.mb(), 3);
            let took = inst.join().unwrap();
            match c {
                Cancel::Cancelled => assert!(!took),
                Cancel::Ready => {
                    assert!(took);
                    assert_eq!(mb.ans.reply_len.load(Ordering::Relaxed), 42);
                }
                Cancel::InProgress => {
                    // Quarantined until it finishes: run to completion, or declined.
                    assert!(is_finished(mb.mb(), 3));
                    if took {
                        assert!(is_ready(mb.mb(), 3));
                        assert_eq!(mb.ans.reply_len.load(Ordering::Relaxed), 42);
                    } else {
                        assert_eq!(mb.taken.state.load(Ordering::Acquire), pack(3, DECLINED));
                    }
                }
            }
        });
    }

    /// A late take of a cancelled generation racing the take of the mailbox's next call
    /// (the caller re-armed it at once after `Cancelled`):
    /// the next call is taken and answered, and the stale take neither runs nor overwrites
    /// the next call's take or answer.
    #[test]
    fn a_stale_take_never_spoils_the_next_generation() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let mb = Arc::new(mailbox());
            arm(mb.mb(), 3, 33);
            let stale = {
                let mb = mb.clone();
                loom::thread::spawn(move || take(mb.mb(), 3, 33))
            };
            let c = cancel(mb.mb(), 3);
            if c != Cancel::Cancelled {
                // Taken first: the caller would quarantine it; nothing more to model.
                stale.join().unwrap();
                return;
            }
            arm(mb.mb(), 4, 44);
            // Spawned after the re-arm: sees it, as a take after the slot's Acquire.
            let next = answering(&mb, (4, 44));
            assert!(!stale.join().unwrap(), "a cancelled request ran");
            let answered = next.join().unwrap();
            assert!(answered, "the next call was not taken and answered");
            assert!(is_ready(mb.mb(), 4));
        });
    }

    /// The next call of a mailbox is published only after its caller saw the last reply,
    /// and may be taken by another serving thread at once: the last take's word must be
    /// settled by then (DONE before READY), or the last `complete` could overwrite the
    /// next call's TAKEN and the next reply would never be published.
    #[test]
    fn the_last_reply_never_overwrites_the_next_call_s_take() {
        loom::model(|| {
            let mb = Arc::new(mailbox());
            arm(mb.mb(), 3, 33);
            let inst = answering(&mb, (3, 33));
            while !is_ready(mb.mb(), 3) {
                loom::thread::yield_now();
            }
            // The caller arms its next call in the mailbox; another thread takes it.
            arm(mb.mb(), 4, 44);
            let next = answering(&mb, (4, 44));
            assert!(next.join().unwrap(), "the next call was not answered");
            assert!(inst.join().unwrap());
            assert!(is_ready(mb.mb(), 4));
        });
    }

    /// The waiter-flag handshake: a caller that goes to sleep on the answer word is woken
    /// by the reply, in every interleaving, with the futex model that never times out (see
    /// `sys::futex_model`): a lost wake is a deadlock loom reports. The reply's bytes go
    /// through a loom cell, so reading them is checked to happen after their writing.
    #[test]
    fn a_sleeping_caller_is_always_woken_and_sees_the_reply() {
        use crate::channel::wait::{Seats, Spin, Waiter};
        use std::time::{Duration, Instant};
        loom::model(|| {
            let mb = Arc::new(mailbox());
            arm(mb.mb(), 3, 33);
            let body = Arc::new(loom::cell::UnsafeCell::new(0u64));
            let inst = {
                let (mb, body) = (mb.clone(), body.clone());
                loom::thread::spawn(move || {
                    assert!(take(mb.mb(), 3, 33));
                    // SAFETY: the mailbox is TAKEN by this thread: it alone writes the body.
                    body.with_mut(|p| unsafe { *p = 42 });
                    assert!(complete(mb.mb(), 3));
                })
            };
            let mut w = Waiter::new(
                Spin::Fixed(Duration::ZERO),
                Default::default(),
                Seats::none(),
            );
            let r = wait_ready(
                mb.mb(),
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

    /// The async flag's handshake: a future that flags its mailbox either learns at once
    /// that the reply is there, or its doorbell thread, sleeping on the answer word as
    /// `call::future::doorbell_thread` does (the word read before the look at the call,
    /// then the sleep on that value), is woken by the completion. A lost wake-up is a
    /// sleep nobody ends: loom's futex never times out and reports it as a deadlock.
    #[test]
    fn an_async_waiter_either_sees_the_reply_or_is_woken_on_the_answer_word() {
        loom::model(|| {
            let mb = Arc::new(mailbox());
            arm(mb.mb(), 3, 33);
            let inst = answering(&mb, (3, 33));
            if flag_async(mb.mb(), 3) {
                let seen = mb.mb().ans.state.load(Ordering::Acquire);
                if still_waiting(mb.mb(), 3) {
                    let _ = sys::futex_wait(&mb.mb().ans.state, seen, None);
                }
            }
            assert!(inst.join().unwrap());
            assert!(is_ready(mb.mb(), 3));
        });
    }
}
