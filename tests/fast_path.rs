//! The seed's 1 KiB call takes the allocation-free fast path on both sides: after warm-up,
//! neither the calling thread nor the serving thread allocates per call.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aegis_client::CallOptions;

struct Counting;

thread_local! { static WATCHED: Cell<bool> = const { Cell::new(false) }; }
static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Where the first watched allocation happened (so a failure names the code to fix).
static FIRST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Counts an allocation on a watched thread, and records the first one's backtrace (with
/// the thread unwatched meanwhile: the capture allocates).
fn count() {
    if WATCHED.with(|w| w.get()) && ALLOCS.fetch_add(1, Ordering::Relaxed) == 0 {
        WATCHED.with(|w| w.set(false));
        let bt = std::backtrace::Backtrace::force_capture().to_string();
        *FIRST.lock().unwrap() = Some(bt);
        WATCHED.with(|w| w.set(true));
    }
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn one_kib_calls_allocate_nothing_on_caller_or_instance() {
    let bus = support::TestBus::start();
    let server = bus.connect();
    let inst = server.register("fast", "f1", &[]).unwrap();
    let stop = inst.stop_handle();
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(10));
    let payload = vec![1u8; 1024];
    let mut out = Vec::with_capacity(1024);
    let mut exited = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = exited.id();
    exited.wait().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut served = 0u64;
            inst.serve(|req, reply| {
                served += 1;
                // Watch the serving thread from the 100th request on (after warm-up).
                WATCHED.with(|w| w.set(served >= 100));
                reply.extend_from_slice(req.payload());
                Ok(())
            })
            .unwrap();
            WATCHED.with(|w| w.set(false));
        });
        for _ in 0..100 {
            client
                .call_into("fast", "echo", &payload, &opts, &mut out)
                .unwrap();
        }
        WATCHED.with(|w| w.set(true));
        for _ in 0..1000 {
            client
                .call_into("fast", "echo", &payload, &opts, &mut out)
                .unwrap();
        }
        // What a serving thread checks when a slot stays claimed (is its producer gone?):
        // rare, so 1,000 calls seldom show it, but on the same thread it must not allocate.
        assert!(!aegis_client::sys::process_gone(std::process::id()));
        assert!(aegis_client::sys::process_gone(dead_pid));
        WATCHED.with(|w| w.set(false));
        stop.stop();
    });
    assert_eq!(out, payload);
    assert_eq!(
        ALLOCS.load(Ordering::Relaxed),
        0,
        "allocations on the 1 KiB fast path; the first:\n{}",
        FIRST.lock().unwrap().as_deref().unwrap_or("")
    );
}

/// While both sides spin (`Spin::Fixed`), a call makes no system call on the calling
/// thread nor on the serving thread: each installs a seccomp filter that traps every
/// system call (but `rt_sigreturn`, which the trap handler needs) into a counter, then
/// 2,000 calls run. Done in a child process (`syscall_free_child`): a filtered thread can
/// never make another system call, not even to end.
#[test]
fn the_call_path_makes_no_system_call_while_both_sides_spin() {
    let bus = support::TestBus::start();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["syscall_free_child", "--exact", "--ignored", "--nocapture"])
        .env("AEGIS_SYSCALL_CHILD_DIR", bus.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("SYSCALLS ").map(|(_, r)| r.to_owned()))
        .unwrap_or_else(|| panic!("the child said nothing: {text}"));
    assert_eq!(
        line.trim(),
        "caller=0 server=0",
        "system calls on the spinning call path"
    );
}

static TRAPPED_CALLER: AtomicU64 = AtomicU64::new(0);
static TRAPPED_SERVER: AtomicU64 = AtomicU64::new(0);
thread_local! { static SIDE: Cell<u8> = const { Cell::new(0) }; }

extern "C" fn on_sigsys(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only atomics and a thread-local read: no system call in the handler.
    match SIDE.with(|s| s.get()) {
        1 => TRAPPED_CALLER.fetch_add(1, Ordering::Relaxed),
        _ => TRAPPED_SERVER.fetch_add(1, Ordering::Relaxed),
    };
}

/// From now on every system call of this thread but `rt_sigreturn` is skipped and counted.
fn trap_every_syscall(side: u8) {
    SIDE.with(|s| s.set(side));
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let prog = [
        f(BPF_LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        f(BPF_JEQ_K, 0, 1, libc::SYS_rt_sigreturn as u32),
        f(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        f(BPF_RET_K, 0, 0, SECCOMP_RET_TRAP),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a filter program that lives across the call; the kernel copies it.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog
            ),
            0
        );
    }
}

#[test]
#[ignore = "the child process of the_call_path_makes_no_system_call_while_both_sides_spin"]
fn syscall_free_child() {
    let Some(dir) = std::env::var_os("AEGIS_SYSCALL_CHILD_DIR") else {
        return;
    };
    // SAFETY: installs a handler that touches only atomics and a thread-local.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        assert_eq!(libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()), 0);
    }
    let spin = aegis_client::Spin::Fixed(Duration::from_secs(30));
    let opts = aegis_client::BusOptions {
        dir: Some(std::path::PathBuf::from(&dir)),
        spin,
        ..Default::default()
    };
    let server = aegis_client::Bus::connect_with(opts.clone()).unwrap();
    let inst = server
        .register_with(
            "nosys",
            "n1",
            aegis_client::RegisterOptions {
                spin,
                ..Default::default()
            },
        )
        .unwrap();
    let client = aegis_client::Bus::connect_with(opts).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let measured = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (srv_measured, srv_done) = (measured.clone(), done.clone());
    // The serving thread filters itself once the caller has warmed up, and never ends.
    std::thread::spawn(move || {
        let mut filtered = false;
        let _ = inst.serve(|req, out| {
            if !filtered && srv_measured.load(Ordering::Acquire) {
                trap_every_syscall(2);
                filtered = true;
            }
            out.extend_from_slice(req.payload());
            Ok(())
        });
        let _ = srv_done;
    });
    let (c_measured, c_done) = (measured.clone(), done.clone());
    std::thread::spawn(move || {
        let call = CallOptions::timeout(Duration::from_secs(10));
        let payload = [7u8; 1024];
        let mut out = Vec::with_capacity(1024);
        for _ in 0..2000 {
            client
                .call_into("nosys", "m", &payload, &call, &mut out)
                .unwrap();
        }
        c_measured.store(true, Ordering::Release);
        // One call lets the server filter itself (that call's own reply may trap once
        // before the filter is in: the serving thread counts from the next request on).
        client
            .call_into("nosys", "m", &payload, &call, &mut out)
            .unwrap();
        trap_every_syscall(1);
        for _ in 0..2000 {
            // No unwrap: a failing call would print (a system call); the count says it.
            let _ = client.call_into("nosys", "m", &payload, &call, &mut out);
        }
        c_done.store(true, Ordering::Release);
        // A filtered thread can never end: spin until the process exits.
        loop {
            std::hint::spin_loop();
        }
    });
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "\nSYSCALLS caller={} server={}",
        TRAPPED_CALLER.load(Ordering::Relaxed),
        TRAPPED_SERVER.load(Ordering::Relaxed)
    );
    std::process::exit(0);
}

/// A request larger than a ring slot is read in place: the handler's `payload()` points
/// into the caller's shared request heap (a bus memfd mapping), not into a private copy.
#[test]
fn a_large_request_is_read_in_place_from_shared_memory() {
    let bus = support::TestBus::start();
    let server = bus.connect();
    let inst = server.register("big", "b1", &[]).unwrap();
    let stop = inst.stop_handle();
    let client = bus.connect();
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let seen = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            inst.serve(|req, reply| {
                let p = req.payload();
                seen.lock().unwrap().push(support::mapping_of(p));
                reply.extend_from_slice(&p[p.len() - 8..]);
                Ok(())
            })
            .unwrap();
        });
        let r = client
            .call(
                "big",
                "m",
                &payload,
                &CallOptions::timeout(Duration::from_secs(10)),
            )
            .unwrap();
        assert_eq!(r.payload, payload[payload.len() - 8..]);
        stop.stop();
    });
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].contains("/memfd:aegis-"),
        "the payload is not in a bus segment: {:?}",
        seen[0]
    );
}
