// SPDX-License-Identifier: Apache-2.0
//! `wisp console NAME`: attach to a running VM's serial console through the
//! socket its VMM serves (`--serial socket=`, see vmm/src/serial_socket.rs).
//! `Ctrl+]` detaches; the VM keeps running. One client at a time: a second
//! attach is refused, naming the pid of the attached one.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context};

use super::store::Store;

/// The byte `Ctrl+]` sends.
pub const DETACH: u8 = 0x1d;

/// The `--serial` a managed VM's VMM gets.
pub fn serial_spec(store: &Store, name: &str) -> String {
    format!(
        "socket={},log={}",
        store.file(name, "console.sock").display(),
        store.file(name, "console.log").display()
    )
}

/// Full raw mode on stdin (Ctrl+C goes to the guest), restored on drop.
struct Raw(libc::termios);

impl Raw {
    fn new() -> Option<Self> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data that tcgetattr fills.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and termios pointer.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: valid fd and termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self(saved))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: restores what `new` read, on the same fd.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}

fn handshake(s: &mut UnixStream, name: &str) -> anyhow::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            Ok(_) => break,
            Err(e) => return Err(e).context("The console did not answer"),
        }
    }
    s.set_read_timeout(None)?;
    let line = String::from_utf8_lossy(&line);
    if line == "ok" {
        return Ok(());
    }
    if let Some(pid) = line.strip_prefix("busy ") {
        bail!("The console of VM '{name}' is in use by another client (pid {pid}); attach refused (one client at a time)");
    }
    bail!("Unexpected answer from the console socket: '{line}'")
}

enum End {
    Detached,
    StdinClosed,
    VmGone,
}

fn pump(s: &mut UnixStream) -> anyhow::Result<End> {
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: libc::STDIN_FILENO,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two pollfds we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        if fds[1].revents != 0 {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                return Ok(End::VmGone);
            }
            out.write_all(&buf[..n])?;
            out.flush()?;
        }
        if fds[0].revents != 0 {
            // SAFETY: reading into a buffer of the length given.
            let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return Ok(End::StdinClosed);
            }
            let input = &buf[..n as usize];
            match input.iter().position(|&b| b == DETACH) {
                Some(i) => {
                    s.write_all(&input[..i])?;
                    return Ok(End::Detached);
                }
                None => s.write_all(input)?,
            }
        }
    }
}

/// `wisp console NAME`.
pub fn attach(store: &Store, name: &str) -> anyhow::Result<i32> {
    store.load(name)?;
    store.running(name)?;
    let path = store.file(name, "console.sock");
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "Cannot connect to the console of VM '{name}' ({})",
            path.display()
        )
    })?;
    handshake(&mut s, name)?;
    eprint!("Connected to the console of VM '{name}'; Ctrl+] detaches\r\n");
    let end = {
        let _raw = Raw::new();
        pump(&mut s)?
    };
    match end {
        End::Detached | End::StdinClosed => {
            eprintln!("\r\nDetached from VM '{name}'; it keeps running");
        }
        End::VmGone => eprintln!("\r\nThe console closed: VM '{name}' stopped"),
    }
    Ok(0)
}
