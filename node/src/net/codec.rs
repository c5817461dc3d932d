//! careweave's request-response framing: a 4-byte big-endian length, then
//! that many bytes of signed CBOR. A frame longer than the limit is refused
//! from its length alone, before any of it is read or any memory reserved.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes is over the limit of {max} bytes and was refused unread")]
pub struct FrameTooLarge {
    pub len: usize,
    pub max: usize,
}

/// Length-prefixed frames with explicit maximum sizes.
#[derive(Debug, Clone, Default)]
pub struct FrameCodec {
    pub max_request: usize,
    pub max_response: usize,
    /// Counts frames refused for size. libp2p does not report which peer a
    /// failed read came from, so the count is all that can be kept.
    pub refused: Arc<AtomicU64>,
}

/// Frames up to this size are sent with their length prefix in one write.
const COALESCE_UP_TO: usize = 64 * 1024;

async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
    refused: &AtomicU64,
) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len > max {
        refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(len, max, "refused an oversized frame unread");
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            FrameTooLarge { len, max },
        ));
    }
    let mut frame = vec![0u8; len];
    io.read_exact(&mut frame).await?;
    Ok(frame)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    frame: &[u8],
    max: usize,
) -> io::Result<()> {
    if frame.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            FrameTooLarge {
                len: frame.len(),
                max,
            },
        ));
    }
    let len = u32::try_from(frame.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    // yamux sends each write as a frame of its own and TLS each frame as a
    // record, so a prefix written alone costs two more records and packets
    // per message. Small frames go out in one write; large ones are not
    // copied for the sake of one record among many.
    if frame.len() <= COALESCE_UP_TO {
        let mut framed = Vec::with_capacity(4 + frame.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(frame);
        io.write_all(&framed).await?;
    } else {
        io.write_all(&len.to_be_bytes()).await?;
        io.write_all(frame).await?;
    }
    io.close().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_request, &self.refused).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_response, &self.refused).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_response).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    fn block<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Cursor::new(Vec::new());
        block(write_frame(&mut buf, b"hello", 16)).unwrap();
        assert_eq!(buf.get_ref()[..4], [0, 0, 0, 5]);
        let mut read = Cursor::new(buf.into_inner());
        assert_eq!(
            block(read_frame(&mut read, 16, &AtomicU64::new(0))).unwrap(),
            b"hello"
        );
    }

    /// Records the size of every write it is given.
    #[derive(Default)]
    struct Writes(Vec<usize>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.len());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_small_frame_goes_out_in_one_write_and_a_large_one_is_not_copied() {
        let mut small = Writes::default();
        block(write_frame(&mut small, &[7; 300], 1 << 20)).unwrap();
        assert_eq!(small.0, [304], "prefix and body in one write");

        let large = vec![7; COALESCE_UP_TO + 1];
        let mut writes = Writes::default();
        block(write_frame(&mut writes, &large, 1 << 20)).unwrap();
        assert_eq!(writes.0, [4, COALESCE_UP_TO + 1]);

        for body in [vec![1; 300], large] {
            let mut buf = Cursor::new(Vec::new());
            block(write_frame(&mut buf, &body, 1 << 20)).unwrap();
            let mut read = Cursor::new(buf.into_inner());
            let got = block(read_frame(&mut read, 1 << 20, &AtomicU64::new(0))).unwrap();
            assert_eq!(got, body);
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_length_alone() {
        // Claims 4 GiB - 1 and carries nothing: refused without reading or allocating.
        let mut read = Cursor::new(vec![0xff, 0xff, 0xff, 0xff]);
        let refused = AtomicU64::new(0);
        let err = block(read_frame(&mut read, 1024, &refused)).unwrap_err();
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("over the limit of 1024"), "{err}");
        assert_eq!(read.position(), 4, "nothing beyond the prefix was read");
        let mut buf = Cursor::new(Vec::new());
        assert!(block(write_frame(&mut buf, &[0; 17], 16)).is_err());
    }

    #[test]
    fn a_truncated_frame_is_an_error() {
        let mut read = Cursor::new(vec![0, 0, 0, 9, 1, 2]);
        assert!(block(read_frame(&mut read, 16, &AtomicU64::new(0))).is_err());
    }
}
