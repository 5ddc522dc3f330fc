//! Crash reports: if `serve` faults (SIGSEGV, SIGBUS, SIGILL), it writes to its log where
//! (the faulting address, the instruction and stack pointers) and its memory map, then dies
//! of the same signal as before (init restarts it). Without this a crash leaves only
//! "serve was killed by signal 11", and gVisor keeps no core files.
//!
//! The handler runs on the thread's alternate signal stack (std gives every thread one) and
//! uses only async-signal-safe calls: `open`, `read`, `write`, `close`.
#![expect(
    unsafe_code,
    reason = "a signal handler is installed with sigaction and reads its siginfo and ucontext"
)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the first fault: a second one (on another thread) reports nothing.
static REPORTING: AtomicBool = AtomicBool::new(false);

/// Install the handler for the signals a fault raises.
pub fn install() {
    for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL] {
        // SAFETY: `sa` is fully initialised (zeroed, then the handler, flags and an empty
        // mask set); `on_fault` has the `SA_SIGINFO` signature and is async-signal-safe.
        // SA_RESETHAND puts the default action back, so the re-run faulting instruction
        // kills the process as it would have without this handler.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fault as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    if REPORTING.swap(true, Ordering::SeqCst) {
        return;
    }
    let mut line = Line::default();
    line.text(b"sandpit-agent: serve got signal 0x");
    line.hex(sig as u64);
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo and ucontext for the
    // signal being delivered; both are only read here.
    unsafe {
        if !info.is_null() {
            line.text(b" code 0x");
            line.hex((*info).si_code as u64);
            line.text(b" at 0x");
            line.hex((*info).si_addr() as u64);
        }
        #[cfg(target_arch = "x86_64")]
        if !ctx.is_null() {
            let uc = &*(ctx as *const libc::ucontext_t);
            line.text(b" rip 0x");
            line.hex(uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64);
            line.text(b" rsp 0x");
            line.hex(uc.uc_mcontext.gregs[libc::REG_RSP as usize] as u64);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = ctx;
    }
    line.text(b" tid 0x");
    line.hex(rustix::thread::gettid().as_raw_nonzero().get() as u64);
    line.text(b"; memory map:\n");
    line.flush();
    copy_maps();
    // The default action is back (SA_RESETHAND): the signal, pending until this handler
    // returns, ends the process as it would have ended (a signal sent with kill(2) too,
    // which no re-run instruction would raise again).
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(sig) };
}

/// Copy `/proc/self/maps` to stderr, at most 64 KiB.
fn copy_maps() {
    let mut buf = [0u8; 512];
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return;
    }
    let mut left: usize = 64 * 1024;
    while left > 0 {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let n = n as usize;
        // SAFETY: the first `n` bytes of `buf` were just read.
        unsafe { libc::write(2, buf.as_ptr().cast(), n) };
        left = left.saturating_sub(n);
    }
    // SAFETY: `fd` was opened above and is not used after.
    unsafe { libc::close(fd) };
}

/// A fixed buffer for one line, written with one `write`.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn text(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn hex(&mut self, v: u64) {
        let mut digits = [0u8; 16];
        for (i, d) in digits.iter_mut().enumerate() {
            *d = b"0123456789abcdef"[((v >> ((15 - i) * 4)) & 0xf) as usize];
        }
        let first = digits.iter().position(|&d| d != b'0').unwrap_or(15);
        self.text(&digits[first..]);
    }

    fn flush(&self) {
        // SAFETY: the first `len` bytes of `buf` are initialised.
        unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_has_no_leading_zeros() {
        let mut l = Line::default();
        l.hex(0);
        l.text(b" ");
        l.hex(0x7f00_dead_beef);
        assert_eq!(&l.buf[..l.len], b"0 7f00deadbeef");
    }
}
