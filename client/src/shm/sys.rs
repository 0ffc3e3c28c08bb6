//! Platform layer: every raw Linux call the client makes goes through here.
//!
//! Contract: functions return `io::Result`, never panic on a syscall failure, and take
//! shared-memory words as `&AtomicU32` so the caller keeps the aliasing rules. Futex
//! calls are *shared* (no `FUTEX_PRIVATE_FLAG`): the words live in `MAP_SHARED` memfd
//! mappings and are waited on from several processes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use crate::shm::sync::AtomicU32;

/// Turns a `-1` return into the thread's `errno`.
macro_rules! syscall {
    ($e:expr) => {{
        let r = $e;
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }};
}

/// Sleeps while `*word == expected`, at most `timeout`. Returns `Ok(())` on a wake-up, a
/// value mismatch (`EAGAIN`), a signal (`EINTR`) or a timeout: the caller always
/// re-checks its condition, so the reason does not matter.
#[cfg(not(loom))]
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<()> {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call (borrowed);
    // FUTEX_WAIT only reads it. `ts_ptr` is null or points to a live timespec.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    match syscall!(r) {
        Ok(_) => Ok(()),
        Err(e) => match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ETIMEDOUT) => Ok(()),
            _ => Err(e),
        },
    }
}

/// Wakes up to `n` waiters on `word`; returns how many were woken.
#[cfg(not(loom))]
pub fn futex_wake(word: &AtomicU32, n: u32) -> io::Result<usize> {
    // SAFETY: `word` is a valid, aligned u32 (borrowed); FUTEX_WAKE does not access it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n.min(i32::MAX as u32),
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    syscall!(r).map(|n| n as usize)
}

/// How many words one [`futex_waitv`] may sleep on (the kernel's `FUTEX_WAITV_MAX`).
pub const FUTEX_WAITV_MAX: usize = 128;

/// Sleeps while every `words[i] == expected[i]` (at most [`FUTEX_WAITV_MAX`] of them), at
/// most `timeout`, until one of them is woken. Returns `Ok(())` on a wake-up, a value
/// mismatch (`EAGAIN`), a signal (`EINTR`) or the timeout: as with [`futex_wait`], the
/// caller re-checks its conditions. Linux 5.16 or later (`ENOSYS`
/// before: the caller falls back to polling).
#[cfg(not(loom))]
pub fn futex_waitv(words: &[(&AtomicU32, u32)], timeout: Duration) -> io::Result<()> {
    /// `struct futex_waitv` of `<linux/futex.h>`.
    #[repr(C)]
    struct FutexWaitv {
        val: u64,
        uaddr: u64,
        flags: u32,
        reserved: u32,
    }
    /// `FUTEX2_SIZE_U32`; shared (no `FUTEX2_PRIVATE`), as every futex here.
    const SIZE_U32: u32 = 0x02;
    if words.is_empty() || words.len() > FUTEX_WAITV_MAX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let waiters: Vec<FutexWaitv> = words
        .iter()
        .map(|(w, v)| FutexWaitv {
            val: *v as u64,
            uaddr: w.as_ptr() as u64,
            flags: SIZE_U32,
            reserved: 0,
        })
        .collect();
    // The timeout is absolute, on the clock named.
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local.
    syscall!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) })?;
    let nanos = now.tv_nsec as u64 + timeout.subsec_nanos() as u64;
    let until = libc::timespec {
        tv_sec: now
            .tv_sec
            .saturating_add(timeout.as_secs().min(i32::MAX as u64) as libc::time_t)
            .saturating_add((nanos / 1_000_000_000) as libc::time_t),
        tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `waiters` holds `words.len()` live, initialised entries whose addresses are
    // valid, aligned u32 words borrowed for the call (FUTEX_WAIT semantics: only read);
    // `until` is a live timespec.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            waiters.len() as libc::c_uint,
            0u32,
            &until as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    match syscall!(r) {
        Ok(_) => Ok(()),
        Err(e) => match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ETIMEDOUT) => Ok(()),
            _ => Err(e),
        },
    }
}

/// The futex as loom sees it: one wait queue for every word (so any wake may be
/// spurious, as the kernel allows), the value check and the sleep atomic with respect to
/// wakes (as the kernel's hash-bucket lock makes them), and *no timeout*: a waiter nobody
/// wakes sleeps forever, which loom reports as a deadlock. So a model in which a wake-up
/// can be lost fails, where the real code's periodic re-check would have hidden it.
#[cfg(loom)]
mod futex_model {
    use loom::sync::{Condvar, Mutex};

    loom::lazy_static! {
        static ref QUEUE: (Mutex<u64>, Condvar) = (Mutex::new(0), Condvar::new());
    }

    pub(super) fn wait(word: &super::AtomicU32, expected: u32) {
        wait_all(&[(word, expected)])
    }

    pub(super) fn wait_all(words: &[(&super::AtomicU32, u32)]) {
        let (m, cv) = &*QUEUE;
        let mut wakes = m.lock().unwrap();
        if words
            .iter()
            .any(|(w, v)| w.load(std::sync::atomic::Ordering::SeqCst) != *v)
        {
            return;
        }
        let seen = *wakes;
        while *wakes == seen {
            wakes = cv.wait(wakes).unwrap();
        }
    }

    pub(super) fn wake() {
        let (m, cv) = &*QUEUE;
        *m.lock().unwrap() += 1;
        cv.notify_all();
    }
}

#[cfg(loom)]
pub fn futex_wait(word: &AtomicU32, expected: u32, _: Option<Duration>) -> io::Result<()> {
    futex_model::wait(word, expected);
    Ok(())
}

#[cfg(loom)]
pub fn futex_wake(_: &AtomicU32, n: u32) -> io::Result<usize> {
    futex_model::wake();
    Ok(n as usize)
}

#[cfg(loom)]
pub fn futex_waitv(words: &[(&AtomicU32, u32)], _: Duration) -> io::Result<()> {
    futex_model::wait_all(words);
    Ok(())
}

/// Creates an anonymous, sealable shared-memory file of `size` bytes (zero-filled).
pub fn memfd(name: &str, size: u64) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(io::Error::from)?;
    let file = File::from(fd);
    file.set_len(size)?;
    Ok(OwnedFd::from(file))
}

/// A second, read-only descriptor of the memfd `fd` (through `/proc/self/fd`), after
/// taking the file's permission bits down to owner-read (`0400`): a peer handed it can
/// map the file only read-only (`mmap(PROT_WRITE)`, `mprotect` and `write(2)` fail with
/// EACCES/EBADF), and cannot reopen it writable through its own `/proc/self/fd` either,
/// unless it runs as the file's owner (the broker's uid) or root. Whoever holds `fd` keeps
/// writing.
pub fn reopen_read_only(fd: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let file = File::from(fd.try_clone()?);
    file.set_permissions(std::fs::Permissions::from_mode(0o400))?;
    let ro = std::fs::OpenOptions::new()
        .read(true)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(OwnedFd::from(ro))
}

/// Seals a memfd so nobody can resize it or map it writable from now on. Mappings made
/// before the seal (the broker's own) stay writable: that is what makes the broker the
/// single writer of the registry while every client maps the very same file.
pub fn seal_read_only(fd: &OwnedFd) -> io::Result<()> {
    add_seals(fd, SIZE_SEALS | F_SEAL_FUTURE_WRITE)
}

/// `F_SEAL_FUTURE_WRITE` (Linux 5.1), not in every libc crate version.
const F_SEAL_FUTURE_WRITE: libc::c_int = 0x0010;

/// Checks that nobody can map `fd` writable or `write(2)` to it any more (a segment with
/// a single writer that mapped it before sealing it, see [`seal_read_only`]).
pub fn check_write_sealed(fd: &OwnedFd) -> Result<(), String> {
    // SAFETY: plain fcntl on a descriptor we hold; no memory is passed.
    let seals = syscall!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
        .map_err(|e| format!("not a sealable memfd ({e})"))?;
    if seals & (F_SEAL_FUTURE_WRITE | libc::F_SEAL_WRITE) == 0 {
        return Err(format!(
            "segment is still writable by whoever holds it (seals {seals:#x}, need F_SEAL_FUTURE_WRITE)"
        ));
    }
    Ok(())
}

/// The seals every segment handed to a peer carries: nobody can shrink it (a mapping
/// past the new end would SIGBUS whoever touches it, the broker first), grow it, or
/// take the seals off again.
pub const SIZE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Seals a memfd's size (see [`SIZE_SEALS`]) before it leaves the broker. Writable
/// mappings stay possible: peers write rings and mailboxes.
pub fn seal_size(fd: &OwnedFd) -> io::Result<()> {
    add_seals(fd, SIZE_SEALS)
}

/// Adds `seals` (`F_SEAL_*` bits) to a memfd.
pub fn add_seals(fd: &OwnedFd, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: plain fcntl on a descriptor we own; no memory is passed.
    syscall!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) }).map(drop)
}

/// Checks that a descriptor a peer handed over is a memfd whose size can no longer
/// change and is `expected` bytes, *before* anything maps it: a file that could be
/// truncated under a mapping would let its sender kill the mapper with SIGBUS.
/// Anything that is not a memfd has no seals and is refused here too.
pub fn check_size_sealed(fd: &OwnedFd, expected: Option<u64>) -> Result<u64, String> {
    // SAFETY: plain fcntl on a descriptor we hold; no memory is passed.
    let seals = syscall!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
        .map_err(|e| format!("not a sealable memfd ({e})"))?;
    let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    if seals & need != need {
        return Err(format!(
            "segment is not sealed against resizing (seals {seals:#x}, need {need:#x})"
        ));
    }
    let size = file_size(fd).map_err(|e| format!("fstat: {e}"))?;
    match expected {
        Some(want) if want != size => Err(format!("segment is {size} bytes, expected {want}")),
        _ => Ok(size),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock `Instant` reads; the same in every process).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `Instant::now()` for a call's start, at a third of its cost where it can be had so.
///
/// On x86_64 with the kernel's clocksource the TSC (`Instant::now()` is then itself the TSC
/// scaled by the vDSO: about 23 ns a read on the 2-core VM, against 9 ns for `rdtsc`), a
/// thread's reading less than [`FAST_CLOCK_SPAN`] TSC ticks after its last real one is that
/// real reading moved on by the ticks since, scaled by the TSC's rate as measured by this
/// process (its first real reading against one at least [`CALIBRATION`] later). The error
/// is the rate's (a few parts per million) over at most the span (about 50 µs): well under
/// a nanosecond. Anywhere else, until the rate is known, or after the span: `Instant::now()`.
/// A call reads the clock before it publishes its request, on the round trip's path.
#[inline]
pub(crate) fn fast_now() -> std::time::Instant {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    {
        fast_clock::now()
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    {
        std::time::Instant::now()
    }
}

/// Whether [`fast_now`] extrapolates (the TSC's rate is measured), or never will.
#[cfg(test)]
fn fast_now_is_calibrated() -> bool {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    {
        fast_clock::calibrated()
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    {
        true
    }
}

/// TSC ticks after a real clock reading that [`fast_now`] extrapolates (2^17: 50 µs at
/// 2.6 GHz).
const FAST_CLOCK_SPAN: u64 = 1 << 17;

/// How far apart the two real readings are that measure the TSC's rate (see [`fast_now`]).
const CALIBRATION: Duration = Duration::from_millis(10);

#[cfg(all(target_arch = "x86_64", not(loom)))]
mod fast_clock {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// Nanoseconds per TSC tick, times 2^32; 0 until measured (never, where the TSC is
    /// not the kernel's clocksource).
    static NS_PER_TICK: AtomicU64 = AtomicU64::new(0);
    /// Whether the TSC is the kernel's clocksource (read once).
    static TSC_SOURCE: OnceLock<bool> = OnceLock::new();
    /// The process's first real reading and its TSC value.
    static FIRST: OnceLock<(Instant, u64)> = OnceLock::new();
    /// A real reading counts only if the TSC values read around it are at most this far
    /// apart (about 1.6 µs at 2.6 GHz): a thread preempted in between would skew the rate
    /// and the extrapolations from it.
    const PAIR_TICKS: u64 = 1 << 12;

    thread_local! {
        /// This thread's last real reading and its TSC value.
        static ANCHOR: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
    }

    fn tsc() -> u64 {
        // SAFETY: `rdtsc` has no preconditions on x86_64 (reading it is not disabled for
        // user space on Linux, which `Instant` itself relies on here via the vDSO).
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    /// Whether the kernel keeps time with the TSC (so it is stable and the same on every
    /// CPU, as far as the kernel trusts it).
    fn tsc_is_clocksource() -> bool {
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .is_ok_and(|s| s.trim() == "tsc")
    }

    #[cfg(test)]
    pub(super) fn calibrated() -> bool {
        NS_PER_TICK.load(Relaxed) != 0 || TSC_SOURCE.get() == Some(&false)
    }

    #[inline]
    pub(super) fn now() -> Instant {
        // Relaxed here and at the store: the rate is a value on its own (no other memory
        // is published through it), and any thread may measure and store it.
        let rate = NS_PER_TICK.load(Relaxed);
        if rate != 0 {
            if let Some((at, t0)) = ANCHOR.with(Cell::get) {
                let ticks = tsc().wrapping_sub(t0);
                if ticks < super::FAST_CLOCK_SPAN {
                    // ticks < 2^17 and rate < 2^36 (16 ns per tick): no overflow.
                    return at + Duration::from_nanos((ticks * rate) >> 32);
                }
            }
        }
        real()
    }

    /// A real reading, anchoring this thread's next ones, and measuring the rate once.
    #[cold]
    fn real() -> Instant {
        if !*TSC_SOURCE.get_or_init(tsc_is_clocksource) {
            return Instant::now();
        }
        let t1 = tsc();
        let at = Instant::now();
        let t2 = tsc();
        let spread = t2.wrapping_sub(t1);
        if spread > PAIR_TICKS {
            // Preempted (or migrated) in between: this pair says nothing exact.
            return at;
        }
        let t = t1.wrapping_add(spread / 2);
        ANCHOR.with(|a| a.set(Some((at, t))));
        let &(at0, t0) = FIRST.get_or_init(|| (at, t));
        if NS_PER_TICK.load(Relaxed) == 0 {
            let (ns, ticks) = (at.duration_since(at0).as_nanos(), t.wrapping_sub(t0));
            if ns >= super::CALIBRATION.as_nanos() && ticks > 0 {
                let rate = ((ns << 32) / ticks as u128).min(1 << 36) as u64;
                NS_PER_TICK.store(rate, Relaxed);
            }
        }
        at
    }
}

/// Asks the cache for the line at `p` (a hint: no fault, no ordering; any address).
#[inline]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 reads nothing architecturally and never faults, whatever `p`.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks for the line at `p` to be brought into this core's cache for writing (a hint, like
/// [`prefetch`]): a store to a line another core has read must first take it back from
/// that core, and a store buffer full of such stores holds up the next locked instruction.
/// PREFETCHW (on x86 processors without it, an instruction of the reserved-NOP space).
#[inline]
pub fn prefetch_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW writes nothing architecturally, never faults whatever `p`, and
    // touches no register but its address operand.
    unsafe {
        std::arch::asm!("prefetchw byte ptr [{0}]", in(reg) p, options(nostack, preserves_flags, readonly))
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// What a [`prefetch_range`] brings the lines in for.
#[derive(Clone, Copy)]
pub enum PrefetchFor {
    Reading,
    Writing,
}

/// [`prefetch`] or [`prefetch_write`] for every line of the `len` bytes at `p`.
#[inline]
pub fn prefetch_range(p: *const u8, len: usize, what: PrefetchFor) {
    for off in (0..len).step_by(64) {
        let line = p.wrapping_add(off);
        match what {
            PrefetchFor::Reading => prefetch(line),
            PrefetchFor::Writing => prefetch_write(line),
        }
    }
}

/// 64 random bits from the kernel (`getrandom`); falls back to time and pid if the call
/// fails (then only uniqueness, not secrecy, is what the caller gets).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into our 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        return unix_millis() ^ (std::process::id() as u64) << 32;
    }
    u64::from_le_bytes(b)
}

/// Size of the file behind `fd`.
pub fn file_size(fd: &OwnedFd) -> io::Result<u64> {
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    Ok(st.st_size as u64)
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/PID/stat`), so a
/// recycled pid can be told apart from the process that used to have it. A process that
/// has exited but is not yet reaped (zombie) is `NotFound` like one that is gone.
pub fn process_start_time(pid: u32) -> io::Result<u64> {
    use std::io::{Read, Write};
    use std::os::unix::ffi::OsStrExt;
    // Allocation-free: a serving thread calls this on the call path (a wedged ring slot),
    // where nothing may allocate. The path and the line live on the stack; the errors are
    // kinds (no boxed message).
    let mut path = [0u8; 32];
    let len = {
        let mut w = &mut path[..];
        write!(w, "/proc/{pid}/stat")?;
        32 - w.len()
    };
    let mut file = std::fs::File::open(std::ffi::OsStr::from_bytes(&path[..len]))?;
    // A stat line is a few hundred bytes (the command name is at most 64).
    let mut buf = [0u8; 1024];
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    parse_start_time(&buf[..n])
}

/// Field 22 (start time) of a `/proc/PID/stat` line; `NotFound` for a zombie or a dead
/// process. The command name (field 2) may contain spaces and parentheses: the fields
/// are counted after the last `)`.
fn parse_start_time(stat: &[u8]) -> io::Result<u64> {
    let malformed = || io::Error::from(io::ErrorKind::InvalidData);
    let close = stat
        .iter()
        .rposition(|&b| b == b')')
        .ok_or_else(malformed)?;
    let rest = std::str::from_utf8(&stat[close + 1..]).map_err(|_| malformed())?;
    let mut fields = rest.split_ascii_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return Err(io::ErrorKind::NotFound.into());
    }
    fields
        .nth(18)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)
}

/// Whether process `pid` has certainly exited (gone, or a zombie). A process we cannot
/// inspect counts as alive: only proof of death frees what it holds.
pub fn process_gone(pid: u32) -> bool {
    match process_start_time(pid) {
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(_) => !process_exists(pid),
    }
}

/// Whether a process with this pid exists (it may be a zombie or belong to another user).
///
/// Pids read from shared memory may be anything: 0 and values above `i32::MAX` are no
/// process (to `kill` they would name this process's group, or every process, or a group,
/// which "exists" and would keep what such a "pid" holds forever).
pub fn process_exists(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 performs only the permission and existence check.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Milliseconds since the Unix epoch (for timestamps shown to people).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A non-blocking eventfd (used to stop a thread blocked in `poll`).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = syscall!(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

pub fn eventfd_signal(fd: &OwnedFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to a descriptor we own.
    syscall!(unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) }).map(drop)
}

/// `fork()` children since the handler was installed (see [`fork_generation`]).
static FORKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times this process is a `fork()` child of the process that loaded us: 0 in the
/// original process, counted by a `pthread_atfork` child handler installed here at the
/// first call. Objects made before a fork compare it with the value they were made under,
/// so an inherited connection or instance never acts on the parent's registrations.
pub fn fork_generation() -> u64 {
    static HANDLER: std::sync::Once = std::sync::Once::new();
    extern "C" fn child() {
        // Relaxed: the child has one thread at this point; later loads are on it or on
        // threads it spawns afterwards (spawning synchronises).
        FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    HANDLER.call_once(|| {
        // SAFETY: registers a handler that only increments an atomic (async-signal-safe, as
        // a fork child handler must be); it is never unregistered, and the function lives
        // for the whole program.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(child)) };
        if rc != 0 {
            tracing::warn!(
                "pthread_atfork failed ({rc}): objects inherited across fork are not detected"
            );
        }
    });
    forks_seen()
}

/// [`fork_generation`] without installing the handler: for objects made after a call to
/// it (every connection's, at connect), so the call path pays one relaxed load, not a
/// `Once` check too.
#[inline]
pub fn forks_seen() -> u64 {
    // Relaxed: see `child` in `fork_generation`.
    FORKS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pids read from shared memory that `kill(2)` would take for a group or for every
    /// process are no process.
    #[test]
    fn pids_that_name_no_single_process_do_not_exist() {
        assert!(process_exists(std::process::id()));
        // To kill(2): this process's group, every process, a process group.
        for pid in [0, u32::MAX, 1 << 31, (1 << 31) | std::process::id()] {
            assert!(!process_exists(pid), "{pid:#x}");
        }
    }

    /// `fast_now` agrees with `Instant::now` read around it, once the TSC's rate is known
    /// (at once where the TSC is not the clocksource: then it is `Instant::now`).
    #[test]
    fn fast_now_is_the_clock() {
        use std::time::{Duration, Instant};
        let until = Instant::now() + Duration::from_secs(5);
        let mut checked = 0;
        while Instant::now() < until && checked < 100_000 {
            let before = Instant::now();
            let t = fast_now();
            let after = Instant::now();
            let slack = Duration::from_micros(1);
            assert!(
                t + slack >= before && t <= after + slack,
                "fast_now {t:?} outside [{before:?}, {after:?}]"
            );
            // Counted once the rate is measured (or never will be).
            if fast_now_is_calibrated() {
                checked += 1;
            }
        }
        assert_eq!(
            checked, 100_000,
            "the TSC's rate was not measured within 5 s"
        );
    }

    #[test]
    fn start_time_is_field_22_counted_after_the_last_parenthesis() {
        // A command name with spaces and parentheses; fields 3.. follow the last ')'.
        let line = b"42 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 23 24\n";
        assert_eq!(parse_start_time(line).unwrap(), 987654);
        let zombie = b"42 (x) Z 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 23\n";
        assert_eq!(
            parse_start_time(zombie).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        for bad in [&b"42 no parenthesis"[..], b"42 (x) S 1 2", b"42 (x) S \xff"] {
            assert_eq!(
                parse_start_time(bad).unwrap_err().kind(),
                io::ErrorKind::InvalidData
            );
        }
        let me = process_start_time(std::process::id()).unwrap();
        assert!(me > 0);
    }
}
