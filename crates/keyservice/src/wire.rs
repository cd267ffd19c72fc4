//! Frames over a byte stream: the adapter between TCP and the sans-IO
//! [`qkdnet_media::proto`] codec, shared by the server, terminals and charging
//! points. Reads are bounded by [`MAX_FRAME`] and by a deadline.

use std::time::Duration;

use qkdnet_media::proto::{HEADER_LEN, MAX_FRAME, Message, frame_len};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{KsError, Result};

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Option<Message>> {
    tokio::time::timeout(timeout, read_inner(r))
        .await
        .map_err(|_| KsError::Net(format!("no message within {} s", timeout.as_secs())))?
}

async fn read_inner<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>> {
    let mut buf = [0u8; MAX_FRAME];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r
            .read(&mut buf[got..HEADER_LEN])
            .await
            .map_err(|e| KsError::Net(e.to_string()))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(KsError::Net("connection closed inside a frame".into()));
        }
        got += n;
        // Garbage is refused as soon as its first bytes show it.
        frame_len(&buf[..got])?;
    }
    let len = frame_len(&buf[..HEADER_LEN])?.expect("invariant: the header is complete");
    r.read_exact(&mut buf[HEADER_LEN..len])
        .await
        .map_err(|e| KsError::Net(format!("connection closed inside a frame: {e}")))?;
    Ok(Some(Message::decode(&buf[..len])?))
}

/// Writes messages as consecutive frames in one write.
pub async fn write_messages<W: AsyncWrite + Unpin>(w: &mut W, msgs: &[Message]) -> Result<()> {
    let mut out = Vec::with_capacity(128 * msgs.len());
    for m in msgs {
        out.extend_from_slice(&m.encode());
    }
    w.write_all(&out)
        .await
        .map_err(|e| KsError::Net(e.to_string()))
}
