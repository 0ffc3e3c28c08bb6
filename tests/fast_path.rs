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
