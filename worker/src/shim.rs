//! Calling the C++ shim (`csrc/`): an entry point that can fail returns non-zero (or a null
//! handle) and writes a NUL-terminated message into a buffer the caller provides; it keeps no
//! pointer to that buffer and never lets an exception cross the C ABI.

use std::ffi::{CStr, c_char, c_int};

/// The buffer a shim call writes its error message into.
pub(crate) struct ErrorBuf([c_char; 1024]);

impl ErrorBuf {
    pub(crate) fn new() -> Self {
        Self([0; 1024])
    }

    /// The pointer and length to pass to the shim.
    pub(crate) fn raw(&mut self) -> (*mut c_char, usize) {
        (self.0.as_mut_ptr(), self.0.len())
    }

    /// The message, without the C++ stack c10's errors append to it.
    #[allow(unsafe_code)]
    pub(crate) fn text(&self) -> String {
        // The shim writes at most len - 1 bytes; the last byte stays NUL either way.
        let mut bytes = self.0;
        bytes[bytes.len() - 1] = 0;
        // SAFETY: NUL-terminated within the buffer (the last byte, at the latest).
        let msg = unsafe { CStr::from_ptr(bytes.as_ptr()) }.to_string_lossy();
        msg.split("\nException raised from")
            .next()
            .unwrap_or_default()
            .trim_end()
            .to_owned()
    }

    /// `Ok` for return code 0, else the message.
    pub(crate) fn checked(&self, rc: c_int) -> Result<(), String> {
        if rc == 0 { Ok(()) } else { Err(self.text()) }
    }
}

/// Runs one shim call that takes an error buffer last; `Ok` when it returns 0.
pub(crate) fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = ErrorBuf::new();
    let (ptr, len) = err.raw();
    let rc = f(ptr, len);
    err.checked(rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_drops_the_cpp_stack() {
        let mut err = ErrorBuf::new();
        let text = b"CUDA error: out of memory\nException raised from alloc at x.cpp:1";
        for (dst, src) in err.0.iter_mut().zip(text) {
            *dst = *src as c_char;
        }
        assert_eq!(
            err.checked(1).expect_err("rc 1 fails"),
            "CUDA error: out of memory"
        );
        assert_eq!(err.checked(0), Ok(()));
    }
}
