//! A connection's reply mailboxes: the free list, each mailbox's next generation (kept
//! privately, so a peer cannot steer them), and the mailboxes quarantined after a call
//! timed out while its instance was running it.

use std::sync::atomic::{AtomicU32 as StdAtomicU32, AtomicUsize};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use parking_lot::Mutex;

use crate::heap::HeapAlloc;
use crate::layout::ClientSeg;
use crate::mailbox;

/// A mailbox whose call timed out while the instance was running it: (index, generation,
/// request heap block to free once the late reply lands, quarantined since).
type Quarantined = (u32, u32, Option<(u64, u64)>, Instant);

/// How long a mailbox may wait in quarantine for a late reply before it is recycled.
const QUARANTINE_EXPIRY: Duration = Duration::from_secs(60);

/// Free list of this connection's mailboxes, their generations (kept privately, so a
/// peer cannot steer them), and the mailboxes quarantined after a timeout.
pub(crate) struct MailboxPool {
    free: ArrayQueue<u32>,
    gens: Box<[StdAtomicU32]>,
    quarantine: Mutex<Vec<Quarantined>>,
    quarantined: AtomicUsize,
}

impl MailboxPool {
    pub(crate) fn new(n: u32) -> MailboxPool {
        let free = ArrayQueue::new(n as usize);
        for i in 0..n {
            let _ = free.push(i);
        }
        MailboxPool {
            free,
            gens: (0..n).map(|_| StdAtomicU32::new(0)).collect(),
            quarantine: Mutex::new(Vec::new()),
            quarantined: AtomicUsize::new(0),
        }
    }

    /// A free mailbox and its next generation.
    pub(crate) fn acquire(&self, client: &ClientSeg, heap: &HeapAlloc) -> Option<(u32, u32)> {
        if self.quarantined.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            self.reclaim(client, heap);
        }
        let i = self.free.pop()?;
        let g = self.gens[i as usize]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1)
            & mailbox::GEN_MASK;
        Some((i, g))
    }

    pub(crate) fn put(&self, i: u32) {
        let _ = self.free.push(i);
    }

    pub(crate) fn quarantine(&self, i: u32, gen: u32, heap: Option<(u64, u64)>) {
        self.quarantine.lock().push((i, gen, heap, Instant::now()));
        self.quarantined
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Returns quarantined mailboxes whose late reply has arrived to the free list.
    pub(crate) fn reclaim(&self, client: &ClientSeg, heap: &HeapAlloc) {
        let mut q = self.quarantine.lock();
        q.retain(|&(i, gen, block, since)| {
            let Some((mb, _)) = client.mailbox(i) else {
                return false;
            };
            // Expired: the instance died while running the request (a live one answers
            // or is declared dead long before). Its reply can no longer land: `complete`
            // only moves this generation's TAKEN, and `release` ends that generation.
            if !mailbox::is_ready(mb, gen) && since.elapsed() < QUARANTINE_EXPIRY {
                return true;
            }
            mailbox::release(mb, gen);
            if let Some((off, len)) = block {
                heap.free(off, len);
            }
            let _ = self.free.push(i);
            false
        });
        self.quarantined
            .store(q.len(), std::sync::atomic::Ordering::Relaxed);
    }
}
