//! Process-local allocator for a segment's message heap (large payloads that do not fit
//! a ring slot or mailbox). Only the segment's owner allocates, so the free list lives in
//! private memory behind a mutex; the heap bytes themselves are shared.

use std::collections::BTreeMap;

use parking_lot::Mutex;

const ALIGN: u64 = 64;

pub struct HeapAlloc {
    size: u64,
    /// Free ranges by offset -> length, coalesced on free.
    free: Mutex<BTreeMap<u64, u64>>,
}

impl HeapAlloc {
    pub fn new(size: u64) -> HeapAlloc {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        HeapAlloc {
            size,
            free: Mutex::new(free),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// First fit; returns the offset of `len` bytes (rounded up to 64), or `None` if no
    /// free range is large enough.
    pub fn alloc(&self, len: u64) -> Option<u64> {
        let len = len.max(1).div_ceil(ALIGN) * ALIGN;
        let mut free = self.free.lock();
        let (&off, &flen) = free.iter().find(|(_, &l)| l >= len)?;
        free.remove(&off);
        if flen > len {
            free.insert(off + len, flen - len);
        }
        Some(off)
    }

    pub fn free(&self, off: u64, len: u64) {
        let mut len = len.max(1).div_ceil(ALIGN) * ALIGN;
        let mut off = off;
        let mut free = self.free.lock();
        if let Some((&p, &pl)) = free.range(..off).next_back() {
            if p + pl == off {
                free.remove(&p);
                off = p;
                len += pl;
            }
        }
        if let Some(&nl) = free.get(&(off + len)) {
            free.remove(&(off + len));
            len += nl;
        }
        free.insert(off, len);
    }

    /// Bytes currently free (for diagnostics and tests).
    pub fn free_bytes(&self) -> u64 {
        self.free.lock().values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frees_coalesce_back_into_one_range() {
        let h = HeapAlloc::new(1 << 20);
        assert_eq!(h.size(), 1 << 20);
        let a = h.alloc(1000).unwrap();
        let b = h.alloc(5000).unwrap();
        let c = h.alloc(70).unwrap();
        assert!(h.alloc(2 << 20).is_none());
        h.free(b, 5000);
        h.free(a, 1000);
        h.free(c, 70);
        assert_eq!(h.free_bytes(), 1 << 20);
        assert_eq!(h.alloc(1 << 20), Some(0));
    }

    #[test]
    fn blocks_are_64_byte_aligned_first_fit_and_never_overlap() {
        let h = HeapAlloc::new(4096);
        assert_eq!(h.alloc(0), Some(0), "an empty block still takes one unit");
        assert_eq!(h.alloc(1), Some(64));
        assert_eq!(h.alloc(64), Some(128));
        assert_eq!(h.alloc(65), Some(192));
        assert_eq!(h.free_bytes(), 4096 - 320);
        // Freeing the second block leaves a 64-byte hole that a 64-byte block fills first.
        h.free(64, 1);
        assert_eq!(h.alloc(100), Some(320), "too big for the hole");
        assert_eq!(h.alloc(64), Some(64), "first fit: the hole");
        assert_eq!(h.alloc(4096), None);
        assert_eq!(HeapAlloc::new(0).alloc(1), None);
        // Neighbours on both sides coalesce.
        h.free(128, 64);
        h.free(0, 1);
        h.free(64, 64);
        h.free(192, 128);
        h.free(320, 100);
        assert_eq!(h.free_bytes(), 4096);
        assert_eq!(h.alloc(4096), Some(0));
    }
}
