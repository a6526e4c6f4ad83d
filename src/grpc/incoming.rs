//! Accepting gRPC connections with a bound: each open connection holds a permit, and a
//! connection arriving when none is left is closed at once, so idle or slow clients cannot make
//! the broker hold an unbounded number of sockets and HTTP/2 sessions.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Open gRPC connections at most.
pub const MAX_GRPC_CONNECTIONS: usize = 4096;

/// A connection that gives its permit back when it closes.
pub struct LimitedConnection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

/// The accepted connections of `listener`, at most `limit` open at once, with `TCP_NODELAY`
/// (small responses must not wait for delayed ACKs, about 40 ms each).
pub fn limited(
    listener: TcpListener,
    limit: usize,
) -> impl Stream<Item = std::io::Result<LimitedConnection>> {
    let permits = Arc::new(Semaphore::new(limit));
    TcpListenerStream::new(listener).filter_map(move |accepted| match accepted {
        Err(error) => Some(Err(error)),
        Ok(stream) => match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let _ = stream.set_nodelay(true);
                Some(Ok(LimitedConnection {
                    stream,
                    _permit: permit,
                }))
            }
            Err(_) => {
                tracing::warn!(
                    limit,
                    "gRPC connection limit reached; closing a new connection"
                );
                None
            }
        },
    })
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(context, data)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn a_connection_beyond_the_limit_is_closed_and_a_freed_permit_admits_the_next() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = Box::pin(limited(listener, 2));
        let mut clients = Vec::new();
        let mut held = Vec::new();
        for _ in 0..2 {
            clients.push(TcpStream::connect(address).await.unwrap());
            held.push(accepted.next().await.unwrap().unwrap());
        }
        let mut refused = TcpStream::connect(address).await.unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_millis(300), accepted.next());
        assert!(
            next.await.is_err(),
            "the third connection is not handed to the server"
        );
        let mut buffer = [0u8; 1];
        assert_eq!(refused.read(&mut buffer).await.unwrap(), 0, "it was closed");

        held.pop();
        let _admitted = TcpStream::connect(address).await.unwrap();
        assert!(
            accepted.next().await.unwrap().is_ok(),
            "a freed permit admits the next"
        );
    }
}
