//! The launcher's side of writing to a rank: frames wait in an outbox and go out only as fast
//! as the rank reads them, without ever blocking.
//!
//! A rank streams replies while the launcher sends it control messages (cancellations,
//! sequences to join). If both wrote with blocking calls, each could fill the other's socket
//! buffer and wait for the other to read: a deadlock that no timeout ends. So the launcher
//! never blocks on a write: what does not fit in the socket now stays here, and is sent when
//! [`poll`](libc::poll) says the socket is writable again, while the launcher goes on reading.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// Frames not yet written to a rank's socket, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    bytes: VecDeque<u8>,
}

impl Outbox {
    /// Queues a frame (its bytes as [`encode_frame`](super::ipc::encode_frame) makes them).
    pub fn push(&mut self, frame: &[u8]) {
        self.bytes.extend(frame);
    }

    /// Whether frames are waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Writes as much as the socket takes now, without blocking. A socket that takes nothing
    /// is not an error; a broken one is.
    pub fn flush(&mut self, stream: &UnixStream) -> std::io::Result<()> {
        while !self.bytes.is_empty() {
            let (front, _) = self.bytes.as_slices();
            // SAFETY: `front` is a valid, initialised slice for the length given; the socket
            // is ours. MSG_DONTWAIT makes this one call non-blocking without changing the
            // socket's mode; MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
            let sent = unsafe {
                libc::send(
                    stream.as_raw_fd(),
                    front.as_ptr().cast(),
                    front.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if sent < 0 {
                let error = std::io::Error::last_os_error();
                return match error.kind() {
                    ErrorKind::WouldBlock => Ok(()),
                    ErrorKind::Interrupted => continue,
                    _ => Err(error),
                };
            }
            self.bytes.drain(..sent as usize);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_peer_that_does_not_read_never_blocks_the_writer_and_gets_everything_later() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut outbox = Outbox::default();
        let frame = vec![7u8; 64 << 10];
        // Far more than a socket buffer holds, and nobody reads yet: no call may block.
        for _ in 0..64 {
            outbox.push(&frame);
            outbox.flush(&ours).unwrap();
        }
        assert!(!outbox.is_empty(), "the socket cannot have taken 4 MiB");
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            theirs.read_to_end(&mut all).unwrap();
            all
        });
        while !outbox.is_empty() {
            outbox.flush(&ours).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(ours);
        let received = reader.join().unwrap();
        assert_eq!(received.len(), 64 * frame.len());
        assert!(received.iter().all(|&b| b == 7));
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let mut outbox = Outbox::default();
        outbox.push(&[1, 2, 3]);
        assert!(outbox.flush(&ours).is_err());
    }
}
