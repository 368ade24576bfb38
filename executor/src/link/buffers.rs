//! Buffers a transfer reads into, kept for the next reads once every
//! [`Bytes`] made of them is dropped: a transfer reuses the few megabytes
//! it holds at once. A fresh buffer for each read costs the kernel new
//! zeroed pages to fault in, and the allocator the memory it gave back
//! between reads to grow again. A buffer is handed out empty, its room
//! never written before a read fills it: a new one is not zeroed first.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A pool of buffers of one capacity.
#[derive(Clone, Debug)]
pub struct Buffers(Arc<Kept>);

#[derive(Debug)]
struct Kept {
    free: Mutex<Vec<Vec<u8>>>,
    /// The capacity of each buffer.
    size: usize,
    /// The most buffers kept; more given back are freed.
    most: usize,
}

impl Buffers {
    /// A pool of buffers of room for `size` bytes, keeping at most `most`.
    pub fn new(size: usize, most: usize) -> Buffers {
        Buffers(Arc::new(Kept {
            free: Mutex::new(Vec::new()),
            size,
            most,
        }))
    }

    /// An empty buffer with room for the pool's size: one given back, or
    /// a new one.
    pub fn take(&self) -> Vec<u8> {
        let kept = self.free().pop();
        kept.unwrap_or_else(|| Vec::with_capacity(self.0.size))
    }

    /// The bytes of `buf`, a buffer of this pool, shared without a copy:
    /// `buf` comes back to the pool once every [`Bytes`] of it is dropped.
    pub fn share(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Shared {
            buf,
            pool: self.clone(),
        })
    }

    /// Keeps `buf`, emptied, for a later [`Buffers::take`], unless its
    /// room is not the pool's size or the pool keeps its most.
    pub fn give_back(&self, mut buf: Vec<u8>) {
        let mut free = self.free();
        if buf.capacity() == self.0.size && free.len() < self.0.most {
            buf.clear();
            free.push(buf);
        }
    }

    /// How many buffers it keeps.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.free().len()
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // Nothing panics while holding it.
        self.0.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A buffer lent out as [`Bytes`].
struct Shared {
    buf: Vec<u8>,
    pool: Buffers,
}

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_the_last_bytes_of_it_go() {
        let pool = Buffers::new(64, 8);
        let mut buf = pool.take();
        assert!(buf.is_empty() && buf.capacity() == 64);
        buf.extend_from_slice(b"abc");
        let at = buf.as_ptr();
        let bytes = pool.share(buf);
        assert_eq!(&bytes[..], b"abc");
        let part = bytes.slice(1..);
        drop(bytes);
        assert_eq!(pool.kept(), 0, "a slice of it is still held");
        assert_eq!(&part[..], b"bc");
        drop(part);
        assert_eq!(pool.kept(), 1);
        let again = pool.take();
        assert_eq!(again.as_ptr(), at, "the same memory, not a new buffer");
        assert!(again.is_empty() && again.capacity() == 64);
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn only_buffers_of_the_pool_size_are_kept_and_no_more_than_the_most() {
        let pool = Buffers::new(64, 2);
        pool.give_back(Vec::with_capacity(16));
        assert_eq!(pool.kept(), 0);
        let shared: Vec<Bytes> = (0..3).map(|_| pool.share(pool.take())).collect();
        drop(shared);
        assert_eq!(pool.kept(), 2);
    }
}
