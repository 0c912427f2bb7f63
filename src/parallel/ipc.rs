//! The wire between the main process and its ranks: length-prefixed frames of postcard-encoded
//! messages over a Unix socket.
//!
//! A frame is a little-endian `u32` length followed by that many bytes. [`FrameReader`] collects a
//! frame across reads that time out, so the launcher can poll with short timeouts and watch its
//! children between polls without ever losing a partial frame.

use std::io::{ErrorKind, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::checkpoint::ModelConfig;
pub use crate::generation::session::{EndReason, SequenceRequest, SessionSummary};
pub use crate::generation::{GenerateRequest, GeneratedBatch};
use crate::parallel::memory::RankMemory;

/// Largest frame accepted (1 GiB): a bound on what a peer can make us allocate.
pub const MAX_FRAME_BYTES: usize = 1 << 30;

/// What a rank is told to load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Where the weights are.
    pub location: crate::checkpoint::source::WeightsLocation,
    /// The resolved configuration (already validated by the main process).
    pub config: ModelConfig,
    /// Weight and activation dtype.
    pub dtype: crate::options::WeightDType,
    /// The policy of a policy file (`None`: the built-in policy of the configuration's family).
    pub policy: Option<crate::policy::Policy>,
    /// Chunked prefill and the prefix cache.
    pub prefill: crate::options::PrefillOptions,
}

/// A batch of token sequences for one forward pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardInput {
    /// Token ids `[batch, seq_len]`, row-major.
    pub input_ids: Vec<u32>,
    /// Number of sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// `[batch, seq_len]`, 1 = token, 0 = padding.
    pub attention_mask: Option<Vec<u32>>,
    /// An encoder–decoder's decoder input `[batch, decoder_len]` (BART shifts `input_ids`
    /// right when it is `None`; the other models ignore it).
    pub decoder_input_ids: Option<Vec<u32>>,
}

/// Messages from the main process to every rank.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[expect(
    clippy::large_enum_variant,
    reason = "`Load` is sent once per rank; the other requests are as short-lived"
)]
pub enum Request {
    /// Load the rank's shard.
    Load(LoadSpec),
    /// Run a forward pass.
    Forward(ForwardInput),
    /// Generate for one or several prompts.
    Generate(GenerateRequest),
    /// Start a continuous-batching session with these sequences.
    Session(Vec<SequenceRequest>),
    /// Sent to rank 0 during a session: add these sequences. Not answered.
    Join(Vec<SequenceRequest>),
    /// Sent to rank 0 while it generates: finish these rows (of a generation) or sequences (of
    /// a session) now: a cancelled stream, a matched stop string. Not answered; ignored when
    /// it arrives after the generation.
    Finish(Vec<u32>),
    /// Sent to rank 0 during a session: no sequence will join any more; end the session once
    /// its batch is empty. Not answered.
    EndSession,
    /// Report memory use.
    Memory,
    /// Exit cleanly.
    Shutdown,
}

/// A dense f32 tensor on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Messages from a rank to the main process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// The first frame of a rank: who it is, and the run's secret.
    Hello {
        /// The rank.
        rank: usize,
        /// The secret the launcher passed it.
        secret: String,
    },
    /// How far the rank has got loading its shard, sent during the load request a few times
    /// a second at most (see [`Progress::Loading`](crate::progress::Progress::Loading)).
    Loading {
        /// The rank.
        rank: usize,
        /// Elements of the checkpoint's tensors read so far.
        done: u64,
        /// Elements of all the checkpoint's tensors.
        total: u64,
    },
    /// The shard is loaded.
    Parallelized(RankMemory),
    /// Forward output (rank 0 only; others answer [`Reply::Done`]).
    Forward(WireTensor),
    /// A token rank 0 just chose for a row, sent while a generation runs (streaming).
    Token {
        /// The row (prompt × returned sequence) it extends; in a session, the sequence's id.
        row: u32,
        /// The token.
        token: u32,
    },
    /// Generation output (every rank, so that the main process can check they agree).
    Generated(GeneratedBatch),
    /// A sequence of a session ended (rank 0, during the session).
    Ended {
        /// The sequence.
        id: u32,
        /// Why.
        reason: EndReason,
    },
    /// The session's batch is empty and rank 0 waits for sequences to join or the end of
    /// the session (rank 0, during the session).
    Idle,
    /// What the prefix cache did since the last report (rank 0, during a session).
    PrefixCache(crate::generation::prefix_cache::PrefixCacheReport),
    /// The session ended (every rank, so that the main process can check they agree).
    SessionEnded(SessionSummary),
    /// Memory use.
    Memory(RankMemory),
    /// The request succeeded and this rank has nothing to return.
    Done,
    /// The request failed on this rank.
    Error(String),
    /// The log-probabilities of the token of a session's sequence that the next
    /// [`Reply::Token`] streams (rank 0, during a session, for sequences with `logprobs`).
    Logprobs {
        /// The sequence's id.
        row: u32,
        /// The token's scores.
        logprobs: crate::generation::TokenLogprobs,
    },
}

impl Reply {
    /// Whether this reply is sent during a request rather than as its answer.
    pub fn is_partial(&self) -> bool {
        matches!(
            self,
            Reply::Token { .. }
                | Reply::Logprobs { .. }
                | Reply::Ended { .. }
                | Reply::Idle
                | Reply::PrefixCache(_)
                | Reply::Loading { .. }
        )
    }
}

/// One message as a frame's bytes: its length, then its encoding.
pub fn encode_frame<T: Serialize>(message: &T) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 4];
    postcard::to_io(message, &mut frame)
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
    let len = u32::try_from(frame.len() - 4)
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "frame too large"))?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Writes one message as a frame.
pub fn write_frame<T: Serialize>(stream: &mut impl Write, message: &T) -> std::io::Result<()> {
    stream.write_all(&encode_frame(message)?)?;
    stream.flush()
}

/// Decodes a frame's payload.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> std::io::Result<T> {
    postcard::from_bytes(payload)
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, format!("malformed frame: {e}")))
}

/// Reads one whole frame, blocking.
pub fn read_frame<T: DeserializeOwned>(stream: &mut impl Read) -> std::io::Result<T> {
    let mut reader = FrameReader::default();
    loop {
        if let Some(payload) = reader.poll(stream)? {
            return decode(&payload);
        }
    }
}

/// First size of [`FrameReader`]'s buffer; it doubles with the bytes actually received.
const INITIAL_READ_BYTES: usize = 64 << 10;

/// Accumulates one frame across reads that may time out.
///
/// The buffer grows with the bytes received (doubling from 64 KiB), never to the length a
/// frame claims before its bytes arrive, and is zeroed only as it grows: a peer that claims a
/// large frame and trickles it in a byte at a time costs memory and time in proportion to
/// what it sends.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Received bytes in `..filled`; the rest is zeroed room for the next reads.
    buffer: Vec<u8>,
    filled: usize,
}

impl FrameReader {
    /// Reads what is available; returns the payload once a frame is complete, `None` when the
    /// read timed out first. End of stream is an `UnexpectedEof` error.
    pub fn poll(&mut self, stream: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            let needed = match self.frame_len()? {
                Some(len) if self.filled >= 4 + len => {
                    let payload = self.buffer[4..4 + len].to_vec();
                    self.buffer.copy_within(4 + len..self.filled, 0);
                    self.filled -= 4 + len;
                    if self.filled == 0 && self.buffer.len() > INITIAL_READ_BYTES {
                        // Give a large frame's memory back once it is consumed.
                        self.buffer = Vec::new();
                    }
                    return Ok(Some(payload));
                }
                Some(len) => 4 + len,
                None => 4,
            };
            // More than `filled`, as `needed` is: each read has room for at least one byte.
            let room = needed.min(INITIAL_READ_BYTES.max(2 * self.filled));
            if self.buffer.len() < room {
                self.buffer.resize(room, 0);
            }
            match stream.read(&mut self.buffer[self.filled..room]) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "peer closed the connection",
                    ))
                }
                Ok(n) => self.filled += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn frame_len(&self) -> std::io::Result<Option<usize>> {
        if self.filled < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([
            self.buffer[0],
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
        ]) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("frame of {len} bytes exceeds the limit"),
            ));
        }
        Ok(Some(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out at most `step` bytes per call and times out every other call.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        stall: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.stall = !self.stall;
            if self.stall {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = self.step.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn frames_survive_timeouts_in_the_middle() {
        let mut data = Vec::new();
        write_frame(&mut data, &Request::Memory).unwrap();
        write_frame(&mut data, &Reply::Error("boom".into())).unwrap();
        let mut stream = Trickle {
            data,
            pos: 0,
            step: 1,
            stall: false,
        };
        let mut reader = FrameReader::default();
        let mut frames = Vec::new();
        for _ in 0..100 {
            match reader.poll(&mut stream) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {}
                Err(_) => break,
            }
        }
        assert_eq!(frames.len(), 2);
        assert!(matches!(
            decode::<Request>(&frames[0]).unwrap(),
            Request::Memory
        ));
        assert!(matches!(decode::<Reply>(&frames[1]).unwrap(), Reply::Error(m) if m == "boom"));
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let data = u32::MAX.to_le_bytes().to_vec();
        let mut reader = FrameReader::default();
        let err = reader.poll(&mut data.as_slice()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidData);
    }

    /// Fuzz finding (`tests/fixtures/fuzz/ipc_frames/crash-trickled-large-frame`, a timeout):
    /// a frame claiming 1 MiB, sent a byte per read, made every read allocate and zero a
    /// 1 MiB chunk (15 s for 4 kB under the fuzzer). The buffer now grows with what arrives.
    #[test]
    fn a_large_frame_trickled_in_costs_what_is_sent() {
        let mut data = (1u32 << 29).to_le_bytes().to_vec();
        data.extend(std::iter::repeat_n(7u8, 100_000));
        let mut stream = Trickle {
            data,
            pos: 0,
            step: 1,
            stall: false,
        };
        let mut reader = FrameReader::default();
        let started = std::time::Instant::now();
        let err = loop {
            match reader.poll(&mut stream) {
                Ok(None) => {}
                Ok(Some(_)) => panic!("no frame is complete"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        assert_eq!(reader.filled, 100_004);
        assert!(
            reader.buffer.len() <= 2 * 100_004,
            "{}",
            reader.buffer.len()
        );
        assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
    }

    #[test]
    fn frames_arriving_together_are_returned_one_by_one() {
        let mut data = Vec::new();
        for i in 0..50u32 {
            write_frame(&mut data, &Request::Finish(vec![i; i as usize])).unwrap();
        }
        // A frame larger than the first buffer, then a small one, in one stream.
        write_frame(&mut data, &Request::Finish(vec![u32::MAX; 100_000])).unwrap();
        write_frame(&mut data, &Request::Memory).unwrap();
        let mut stream = data.as_slice();
        let mut reader = FrameReader::default();
        for i in 0..50u32 {
            let frame = reader.poll(&mut stream).unwrap().unwrap();
            assert!(
                matches!(decode(&frame).unwrap(), Request::Finish(v) if v == vec![i; i as usize])
            );
        }
        let frame = reader.poll(&mut stream).unwrap().unwrap();
        assert!(matches!(decode(&frame).unwrap(), Request::Finish(v) if v.len() == 100_000));
        let frame = reader.poll(&mut stream).unwrap().unwrap();
        assert!(matches!(decode(&frame).unwrap(), Request::Memory));
        assert_eq!(reader.filled, 0);
        assert!(reader.poll(&mut stream).is_err());
    }

    #[test]
    fn garbage_payload_is_an_error_not_a_panic() {
        assert!(decode::<Request>(&[0xff, 0xff, 0xff]).is_err());
    }
}
