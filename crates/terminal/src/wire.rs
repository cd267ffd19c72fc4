//! Frames over a byte stream: the adapter between TCP and the sans-IO
//! [`qkdnet_media::proto`] codec, shared by the server, terminals and charging
//! points. Reads are bounded by [`MAX_FRAME`] and by a deadline; callers wrap
//! their stream's read half in a `BufReader`, so a frame (and the challenge
//! that follows an answer) costs one `read` system call, not three.

use std::time::Duration;

use qkdnet_media::proto::{HEADER_LEN, MAX_FRAME, Message, frame_len};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Result, TerminalError};

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Option<Message>> {
    tokio::time::timeout(timeout, read_inner(r))
        .await
        .map_err(|_| TerminalError::Net(format!("no message within {} s", timeout.as_secs())))?
}

async fn read_inner<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r
            .read(&mut head[got..])
            .await
            .map_err(|e| TerminalError::Net(e.to_string()))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(TerminalError::Net(
                "connection closed inside a frame".into(),
            ));
        }
        got += n;
        // Garbage is refused as soon as its first bytes show it.
        frame_len(&head[..got])?;
    }
    let len = frame_len(&head)?.expect("invariant: the header is complete");
    debug_assert!(len <= MAX_FRAME);
    let mut frame = vec![0u8; len];
    frame[..HEADER_LEN].copy_from_slice(&head);
    r.read_exact(&mut frame[HEADER_LEN..])
        .await
        .map_err(|e| TerminalError::Net(format!("connection closed inside a frame: {e}")))?;
    Ok(Some(Message::decode(&frame)?))
}

/// Writes messages as consecutive frames in one write.
pub async fn write_messages<W: AsyncWrite + Unpin>(w: &mut W, msgs: &[Message]) -> Result<()> {
    let mut out = Vec::with_capacity(128 * msgs.len());
    for m in msgs {
        out.extend_from_slice(&m.encode());
    }
    w.write_all(&out)
        .await
        .map_err(|e| TerminalError::Net(e.to_string()))
}
