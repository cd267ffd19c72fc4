//! What the TCP adapter allocates for a frame whose header it cannot yet
//! authenticate: the buffer follows the bytes received, never the length the
//! header claims (security review: a forged header announcing a 160 MiB frame
//! made the reader allocate 160 MiB before a single body byte arrived).
//!
//! A counting global allocator records the largest single allocation made on
//! the test's own thread while it is switched on, so tests running in
//! parallel threads do not disturb each other.

#![allow(
    unsafe_code,
    reason = "a GlobalAlloc is an unsafe trait; this test's allocator only forwards to System (SAFETY comment at each site)"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use qkdnet_link::LinkError;
use qkdnet_link::auth::{HEADER, MAX_FRAME};
use qkdnet_link::tcp::{INITIAL_FRAME_BYTES, read_frame};

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the allocator may run while the thread's locals are torn down.
    let on = TRACKING.try_with(Cell::get).unwrap_or(false);
    if on {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only records sizes in const-initialised thread locals (no
// allocation, no re-entry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    (r, LARGEST.with(Cell::get))
}

/// A provisional frame header (kind 0) announcing a body of `len` bytes.
fn header(seq: u64, len: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&seq.to_le_bytes());
    h[8] = 0;
    h[9..].copy_from_slice(&len.to_le_bytes());
    h
}

#[test]
fn a_forged_header_announcing_160_mib_does_not_allocate_it() {
    let claimed = u32::try_from(MAX_FRAME).expect("MAX_FRAME fits the u32 length field");
    let mut wire = header(0, claimed).to_vec();
    wire.extend_from_slice(&[0x55; 1000]);
    let (r, largest) = largest_allocation(|| read_frame(&mut std::io::Cursor::new(&wire)));
    match r {
        Err(LinkError::Malformed(m)) => assert!(m.contains("inside a frame"), "{m}"),
        other => panic!(
            "expected a truncated frame, got {:?}",
            other.map(|f| f.map(|f| f.len()))
        ),
    }
    assert!(
        largest <= HEADER + INITIAL_FRAME_BYTES,
        "read_frame allocated {largest} bytes for a frame of which 1 013 bytes arrived"
    );
}

#[test]
fn a_large_frame_is_read_whole_with_memory_following_the_bytes() {
    // 3 MiB and a bit: the buffer grows several times before the frame is in.
    let len = (3 << 20) + 12_345;
    let mut wire = header(7, len as u32).to_vec();
    wire.extend((0..len).map(|i| (i * 31 % 251) as u8));
    let (r, largest) = largest_allocation(|| read_frame(&mut std::io::Cursor::new(&wire)));
    let frame = r.expect("read").expect("a frame");
    assert_eq!(frame, wire);
    assert!(
        largest <= 2 * wire.len(),
        "{largest} bytes for a {}-byte frame",
        wire.len()
    );

    // The same frame cut short at any growth step is refused, with the buffer
    // never above about twice what arrived.
    for cut in [
        HEADER + 1,
        HEADER + INITIAL_FRAME_BYTES + 1,
        wire.len() / 2,
        wire.len() - 1,
    ] {
        let (r, largest) =
            largest_allocation(|| read_frame(&mut std::io::Cursor::new(&wire[..cut])));
        assert!(matches!(r, Err(LinkError::Malformed(_))), "cut at {cut}");
        assert!(
            largest <= 2 * cut + INITIAL_FRAME_BYTES,
            "cut at {cut}: allocated {largest} bytes"
        );
    }
}

#[test]
fn a_header_above_the_limit_is_refused_before_any_body_is_read() {
    let over = u32::try_from(MAX_FRAME + 1).expect("fits");
    let wire = header(0, over);
    assert!(matches!(
        read_frame(&mut std::io::Cursor::new(&wire)),
        Err(LinkError::Malformed(_))
    ));
    // End of stream between frames is a clean end.
    assert!(
        read_frame(&mut std::io::Cursor::new(&[] as &[u8]))
            .expect("eof")
            .is_none()
    );
}
