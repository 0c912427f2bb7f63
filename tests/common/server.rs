//! A `parallelformers serve` process on a loopback port, driven over HTTP, for the tests.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::binary;

/// A server on a free loopback port, stopped (SIGTERM) when dropped.
pub struct Server {
    /// The server process.
    pub child: Child,
    /// `http://ADDRESS`.
    pub base: String,
}

impl Server {
    /// Starts `serve` with `args` and waits for its address.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(binary())
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server {
            child,
            base: address,
        }
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GETs `path`; its JSON answer (panics on an error status).
    pub fn get_json(&self, path: &str) -> Value {
        ureq::get(&self.url(path))
            .call()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_json()
            .unwrap()
    }

    /// POSTs JSON; the JSON answer, or the status and JSON error.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, (u16, Value)> {
        match ureq::post(&self.url(path)).send_json(body.clone()) {
            Ok(response) => Ok(response.into_json().unwrap()),
            Err(ureq::Error::Status(code, response)) => Err((code, response.into_json().unwrap())),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    /// The `data:` payloads of a streamed answer, in order.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = ureq::post(&self.url(path)).send_json(body.clone()).unwrap();
        assert_eq!(response.content_type(), "text/event-stream");
        let mut text = String::new();
        response.into_reader().read_to_string(&mut text).unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// Sends SIGTERM and waits for the exit; the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
    }
}

/// The rank processes of a server (children of its process).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}
