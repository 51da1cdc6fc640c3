//! Mixed precision on CUDA: which dtype autocast uses (fp16 or bf16).

use std::ffi::{c_char, c_int};

use axial_common::job::Precision;

#[allow(unsafe_code)]
mod ffi {
    use super::{c_char, c_int};
    unsafe extern "C" {
        pub fn axial_set_cuda_autocast_dtype(
            bf16: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

/// Sets the dtype CUDA autocast computes in (`fp16` or `bf16`); no-op for `fp32`.
#[allow(unsafe_code)]
pub fn set_autocast_dtype(precision: Precision) -> Result<(), String> {
    let bf16 = match precision {
        Precision::Fp32 => return Ok(()),
        Precision::Fp16 => 0,
        Precision::Bf16 => 1,
    };
    // SAFETY: the shim writes at most len bytes into the error buffer and keeps no pointer.
    crate::shim::call(|err, len| unsafe { ffi::axial_set_cuda_autocast_dtype(bf16, err, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shim links and answers (setting the dtype does not need a GPU).
    #[test]
    fn autocast_dtype_can_be_set() {
        set_autocast_dtype(Precision::Bf16).expect("bf16");
        set_autocast_dtype(Precision::Fp16).expect("fp16");
        set_autocast_dtype(Precision::Fp32).expect("fp32 is a no-op");
    }
}
