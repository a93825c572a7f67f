// SPDX-License-Identifier: Apache-2.0
//! `--serial socket=PATH[,log=FILE]`: COM1 on a Unix socket that one client
//! at a time (`wisp console`) attaches to. Guest output goes to the attached
//! client without ever blocking the guest (bytes the client cannot take at
//! once are dropped; with nobody attached they only go to the log file), and
//! the client's input goes to the UART's FIFO.
//!
//! Protocol: on connect the VMM sends one line, `ok` or `busy PID` (another
//! client, that pid, is attached; the connection is then closed), followed
//! (after `ok`) by raw console bytes both ways.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::legacy::SerialDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

type Slot = Arc<Mutex<Option<UnixStream>>>;

/// The listening console socket, until the event loop takes it over.
#[derive(Debug)]
pub struct SerialSocket {
    listener: UnixListener,
    path: PathBuf,
    client: Slot,
}

/// The UART's output: the log file, and the attached client if any.
#[derive(Debug)]
pub struct SocketWriter {
    client: Slot,
    log: Option<File>,
}

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(log) = &mut self.log {
            // A full disk must not stop the guest; the console still works.
            let _ = log.write_all(buf);
        }
        // Non-blocking: what the client cannot take now is dropped. A client
        // that went away is noticed (and dropped) by the event loop.
        if let Some(s) = lock(&self.client).as_mut() {
            let _ = s.write(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(log) = &mut self.log {
            let _ = log.flush();
        }
        Ok(())
    }
}

impl SerialSocket {
    /// Binds `path` (replacing a stale socket file) and opens `log` for appending.
    pub fn bind(path: &Path, log: Option<&Path>) -> std::io::Result<(Self, SocketWriter)> {
        if std::fs::symlink_metadata(path)
            .map(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            })
            .unwrap_or(false)
        {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let log = match log {
            Some(p) => Some(OpenOptions::new().create(true).append(true).open(p)?),
            None => None,
        };
        let client: Slot = Arc::new(Mutex::new(None));
        let writer = SocketWriter {
            client: client.clone(),
            log,
        };
        Ok((
            Self {
                listener,
                path: path.to_path_buf(),
                client,
            },
            writer,
        ))
    }

    /// The event-loop side: accepts clients and feeds their input to `serial`.
    pub fn into_subscriber(
        self,
        serial: Arc<Mutex<SerialDevice>>,
    ) -> std::io::Result<ConsoleServer> {
        let drained = lock(&serial).input_drained_evt().try_clone()?;
        Ok(ConsoleServer {
            socket: self,
            serial,
            drained,
            client_pid: 0,
            reading: false,
        })
    }
}

impl Drop for SerialSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the console socket in the VMM's event loop.
#[derive(Debug)]
pub struct ConsoleServer {
    socket: SerialSocket,
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    client_pid: i32,
    reading: bool,
}

const EV_LISTEN: u32 = 0;
const EV_CLIENT: u32 = 1;
const EV_DRAINED: u32 = 2;

fn peer_pid(s: &UnixStream) -> i32 {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 {
        cred.pid
    } else {
        0
    }
}

impl ConsoleServer {
    fn client_events(fd: i32, reading: bool) -> Events {
        // Without IN, epoll still reports the client hanging up.
        let set = if reading {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        Events::with_data_raw(fd, EV_CLIENT, set)
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((mut s, _)) = self.socket.listener.accept() {
            let mut slot = lock(&self.socket.client);
            if slot.is_some() {
                let _ = writeln!(s, "busy {}", self.client_pid);
                continue;
            }
            if s.set_nonblocking(true).is_err() || s.write_all(b"ok\n").is_err() {
                continue;
            }
            let fd = s.as_raw_fd();
            if ops.add(Self::client_events(fd, true)).is_err() {
                continue;
            }
            self.client_pid = peer_pid(&s);
            self.reading = true;
            *slot = Some(s);
        }
    }

    fn drop_client(&mut self, ops: &mut EventOps) {
        if let Some(s) = lock(&self.socket.client).take() {
            let _ = ops.remove(Self::client_events(s.as_raw_fd(), self.reading));
        }
        self.reading = false;
    }

    fn read_client(&mut self, events: &Events, ops: &mut EventOps) {
        let mut serial = lock(&self.serial);
        let room = serial.input_room();
        let mut slot = lock(&self.socket.client);
        let Some(s) = slot.as_mut() else {
            return;
        };
        let gone = events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR);
        if room == 0 && !gone {
            // Resume once the guest drains its FIFO.
            let fd = s.as_raw_fd();
            if ops.modify(Self::client_events(fd, false)).is_ok() {
                self.reading = false;
            }
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        match s.read(&mut buf[..want]) {
            Ok(n) if n > 0 && want > 0 => {
                serial.enqueue_input(&buf[..n]);
                return;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && !gone => return,
            _ => {}
        }
        drop(slot);
        drop(serial);
        self.drop_client(ops);
    }
}

impl MutEventSubscriber for ConsoleServer {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(
            &self.socket.listener,
            EV_LISTEN,
            EventSet::IN,
        ));
        let _ = ops.add(Events::with_data(&self.drained, EV_DRAINED, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_LISTEN => self.accept(ops),
            EV_CLIENT => self.read_client(&events, ops),
            EV_DRAINED => {
                let _ = self.drained.read();
                if !self.reading {
                    if let Some(s) = lock(&self.socket.client).as_ref() {
                        if ops.modify(Self::client_events(s.as_raw_fd(), true)).is_ok() {
                            self.reading = true;
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use event_manager::{EventManager, SubscriberOps};

    #[test]
    fn test_one_client_input_and_output() {
        let dir = std::env::temp_dir().join(format!("wisp-sersock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("console.sock");
        let log = dir.join("console.log");
        let (socket, mut writer) = SerialSocket::bind(&sock, Some(&log)).unwrap();
        // Nobody attached: output goes only to the log, never blocks.
        writer.write_all(b"early\n").unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(irq, Box::new(std::io::sink())).unwrap(),
        ));
        let mut em = EventManager::<crate::vmm::Subscriber>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(
            socket.into_subscriber(serial.clone()).unwrap(),
        )));
        let line = |s: &mut UnixStream| {
            let mut l = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                l.push(b[0]);
            }
            String::from_utf8(l).unwrap()
        };
        let mut a = UnixStream::connect(&sock).unwrap();
        em.run_with_timeout(1000).unwrap();
        assert_eq!(line(&mut a), "ok");
        let mut b = UnixStream::connect(&sock).unwrap();
        em.run_with_timeout(1000).unwrap();
        assert_eq!(line(&mut b), format!("busy {}", std::process::id()));
        // Output reaches the client; input reaches the UART's FIFO.
        writer.write_all(b"out").unwrap();
        let mut got = [0u8; 3];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out");
        a.write_all(b"k").unwrap();
        em.run_with_timeout(1000).unwrap();
        let mut rbr = [0u8; 1];
        serial.lock().unwrap().read(0, &mut rbr);
        assert_eq!(rbr[0], b'k');
        // Once it leaves, the next client is accepted.
        drop(a);
        em.run_with_timeout(1000).unwrap();
        let mut c = UnixStream::connect(&sock).unwrap();
        em.run_with_timeout(1000).unwrap();
        assert_eq!(line(&mut c), "ok");
        assert!(std::fs::read_to_string(&log)
            .unwrap()
            .starts_with("early\nout"));
        drop(em);
        assert!(!sock.exists(), "the socket file goes with the VMM");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
