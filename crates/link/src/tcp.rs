//! Runs an [`Endpoint`](crate::endpoint::Endpoint) over a TCP stream: the thin adapter around the sans-IO core.
//!
//! Blocking std sockets and one reader thread keep it small: the writer side
//! drains `poll_transmit`, the reader feeds whole frames to `handle_frame`.
//!
//! **Memory before authentication.** A frame is authenticated only as a whole
//! (its tag, or the next tagged frame's, comes after the body), so the length
//! in a header is the peer's unverified claim, up to
//! [`MAX_FRAME`](crate::auth::MAX_FRAME) bytes. The
//! reader therefore never sizes a buffer from the header: it reserves at most
//! [`INITIAL_FRAME_BYTES`] and grows the buffer as body bytes actually arrive
//! (at most doubling what it holds), so a forged header costs the receiver
//! about twice what the forger really sent, not what it announced.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;

use crate::LinkError;
use crate::auth::{HEADER, frame_len};

/// Bytes a frame buffer reserves before its body starts arriving (a bigger
/// frame's buffer grows with the bytes received; module docs).
pub const INITIAL_FRAME_BYTES: usize = 64 << 10;

/// Reads one frame from a stream; `Ok(None)` on a clean end of stream.
///
/// Allocation follows the bytes received, never the length the header claims
/// (module docs): a header announcing a [`MAX_FRAME`](crate::auth::MAX_FRAME)-byte body followed by
/// a few bytes and the end of the stream is refused as truncated after
/// reserving [`INITIAL_FRAME_BYTES`].
pub fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, LinkError> {
    let mut header = [0u8; HEADER];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let total = frame_len(&header)?;
    let mut frame = Vec::with_capacity(total.min(HEADER + INITIAL_FRAME_BYTES));
    frame.extend_from_slice(&header);
    while frame.len() < total {
        // Grow by at most what is held (doubling), so the buffer stays within
        // about twice the bytes the peer actually sent.
        let start = frame.len();
        let step = (total - start).min(start.max(INITIAL_FRAME_BYTES));
        frame.reserve_exact(step);
        frame.resize(start + step, 0);
        r.read_exact(&mut frame[start..]).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                LinkError::Malformed("connection closed inside a frame".into())
            } else {
                e.into()
            }
        })?;
    }
    Ok(Some(frame))
}

/// A connected link: frames from the peer arrive on a channel fed by a reader thread.
pub struct Connection {
    writer: TcpStream,
    incoming: mpsc::Receiver<Result<Vec<u8>, LinkError>>,
}

impl Connection {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Result<Connection, LinkError> {
        stream.set_nodelay(true)?;
        let mut reader = stream.try_clone()?;
        let (tx, rx) = mpsc::sync_channel(64);
        std::thread::spawn(move || {
            loop {
                match read_frame(&mut reader) {
                    Ok(Some(f)) => {
                        if tx.send(Ok(f)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        Ok(Connection {
            writer: stream,
            incoming: rx,
        })
    }

    /// Sends every frame the endpoint has queued.
    pub fn flush(&mut self, ep: &mut crate::endpoint::Endpoint) -> Result<(), LinkError> {
        while let Some(f) = ep.poll_transmit() {
            self.writer.write_all(&f)?;
        }
        self.writer.flush()?;
        Ok(())
    }

    /// Waits for the next frame; `Ok(None)` when the peer closed the connection.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, LinkError> {
        match self.incoming.recv() {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Waits up to `timeout` for the next frame.
    pub fn recv_timeout(&mut self, timeout: std::time::Duration) -> Result<Recv, LinkError> {
        match self.incoming.recv_timeout(timeout) {
            Ok(r) => r.map(Recv::Frame),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(Recv::Timeout),
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(Recv::Closed),
        }
    }

    /// Closes the sending half (the peer's reader sees end of stream).
    pub fn shutdown(&self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
    }
}

impl Drop for Connection {
    /// Closes the socket in both directions, so a party that stops (even on
    /// an error) never leaves its peer waiting, and the reader thread ends.
    fn drop(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
    }
}

/// What [`Connection::recv_timeout`] got.
pub enum Recv {
    /// A frame.
    Frame(Vec<u8>),
    /// Nothing within the timeout.
    Timeout,
    /// The peer closed the connection.
    Closed,
}

/// One block of Bob's input.
pub enum BlockInput {
    /// Offline mode: Bob's sifted bits.
    Offline(qkdnet_postproc::bits::BitVec),
    /// Record mode: Bob's detections.
    Record(Vec<qkdnet_optics::record::Detection>),
}

/// Runs Alice until Bob closes the connection, handing every finished block to `on_event`.
pub fn drive_alice(
    conn: &mut Connection,
    ep: &mut crate::endpoint::Endpoint,
    on_event: &mut dyn FnMut(crate::endpoint::Event),
) -> Result<(), LinkError> {
    loop {
        conn.flush(ep)?;
        let Some(frame) = conn.recv()? else { break };
        ep.handle_frame(&frame)?;
        while let Some(e) = ep.poll_output() {
            on_event(e);
        }
        if let Some(f) = ep.failure() {
            return Err(LinkError::Authentication(f.to_string()));
        }
    }
    conn.flush(ep)?;
    Ok(())
}

/// What Bob's block source has for him.
pub enum Feed {
    /// The next block.
    Block(u64, BlockInput),
    /// Nothing yet (a live source: the next block's detections are still in the fibre).
    NotYet,
    /// No more blocks.
    End,
}

/// Runs Bob over `blocks`, keeping up to `window` blocks in flight so that
/// round trips overlap; closes the connection when every block has ended.
pub fn drive_bob(
    conn: &mut Connection,
    ep: &mut crate::endpoint::Endpoint,
    blocks: &mut dyn Iterator<Item = (u64, BlockInput)>,
    window: usize,
    on_event: &mut dyn FnMut(crate::endpoint::Event),
) -> Result<(), LinkError> {
    let mut next = || match blocks.next() {
        Some((id, input)) => Feed::Block(id, input),
        None => Feed::End,
    };
    drive_bob_live(conn, ep, &mut next, window, on_event)
}

/// [`drive_bob`] over a live source that may have no block ready: while it has
/// none, Bob keeps serving the blocks in flight and polls it again every few
/// milliseconds.
pub fn drive_bob_live(
    conn: &mut Connection,
    ep: &mut crate::endpoint::Endpoint,
    next_block: &mut dyn FnMut() -> Feed,
    window: usize,
    on_event: &mut dyn FnMut(crate::endpoint::Event),
) -> Result<(), LinkError> {
    const POLL: std::time::Duration = std::time::Duration::from_millis(5);
    let mut exhausted = false;
    loop {
        let mut waiting = false;
        while !exhausted && ep.in_flight() < window.max(1) {
            match next_block() {
                Feed::Block(id, BlockInput::Offline(bits)) => ep.start_offline_block(id, &bits)?,
                Feed::Block(id, BlockInput::Record(dets)) => ep.start_record_block(id, dets)?,
                Feed::NotYet => {
                    waiting = true;
                    break;
                }
                Feed::End => exhausted = true,
            }
        }
        conn.flush(ep)?;
        if exhausted && ep.in_flight() == 0 {
            break;
        }
        let frame = if waiting {
            match conn.recv_timeout(POLL)? {
                Recv::Frame(f) => f,
                Recv::Timeout => continue,
                Recv::Closed => return Err(closed()),
            }
        } else {
            conn.recv()?.ok_or_else(closed)?
        };
        ep.handle_frame(&frame)?;
        while let Some(e) = ep.poll_output() {
            on_event(e);
        }
        if let Some(f) = ep.failure() {
            return Err(LinkError::Authentication(f.to_string()));
        }
    }
    conn.flush(ep)?;
    conn.shutdown();
    Ok(())
}

fn closed() -> LinkError {
    LinkError::Protocol("Alice closed the connection with blocks in flight".into())
}
