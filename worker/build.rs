//! Makes every binary, test and bench of this package find libtorch at run time with no
//! environment variables (shared/reference/STACK.md §1).
//!
//! - rpath to this checkout's libtorch, plus `$ORIGIN`-relative ones so that a binary copied
//!   into another checkout's `target/<profile>/` (or a GPU machine) finds `.libtorch/lib` there;
//! - `--no-as-needed -ltorch_cuda` when the CUDA build of libtorch is installed, because the
//!   linker would otherwise drop libtorch_cuda (nothing references it by symbol) and
//!   `Cuda::is_available()` would be false even on a GPU machine (tch-rs #980).
//!
//! It also compiles the worker's C++ shim (`csrc/`) against libtorch's headers.
//!
//! `AXIAL_NO_CUDA=1` skips the CUDA library (for the slim, CPU-only libtorch it is skipped anyway).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=AXIAL_NO_CUDA");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        panic!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys must be a direct dependency");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../../.libtorch/lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../../../.libtorch/lib");
    let cudnn = lib.join("../../nvidia/cudnn/lib/libcudnn.so.9");
    let has_cuda = lib.join("libtorch_cuda.so").exists()
        && cudnn.exists()
        && std::env::var_os("AXIAL_NO_CUDA").is_none();
    // The CUDA runtime beside torch/ (the worker's shim links it), for every package that
    // links the worker.
    let cudart = lib.join("../../nvidia/cu13/lib");
    if has_cuda {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cudart.display());
        for up in ["../..", "../../.."] {
            println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/{up}/.libtorch/../nvidia/cu13/lib");
        }
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        // The shim's NCCL group picks its CUDA device (c10::cuda::set_device).
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-lc10_cuda,--as-needed");
    }
    // The worker's small C++ shim over ATen (only the worker package has one).
    if std::env::var("CARGO_PKG_NAME").as_deref() == Ok("axial-worker") {
        let include = lib.join("../include");
        println!("cargo:rerun-if-changed=csrc");
        let mut build = cc::Build::new();
        // ProcessGroupNCCL's headers include CUDA's and NCCL's: the CUDA libtorch brings
        // nvidia/cu13 and nvidia/nccl, and setup-libtorch.sh adds the two header-only wheels
        // (nvidia-cuda-crt, nvidia-cuda-cccl) it lacks. Without them (the slim CPU libtorch)
        // the NCCL entry points compile to an error that says so.
        let nvidia = lib.join("../../nvidia");
        let cuda_include = nvidia.join("cu13/include");
        let nccl_include = nvidia.join("nccl/include");
        let with_cuda = has_cuda
            && cudart.join("libcudart.so.13").exists()
            && cuda_include.join("cuda_runtime_api.h").exists()
            && cuda_include.join("crt/host_defines.h").exists();
        let with_nccl = with_cuda && nccl_include.join("nccl.h").exists();
        if with_cuda {
            // The CUDA-graph capture of the training step (csrc/cuda_graph.cpp); c10's inline
            // CUDA helpers call the CUDA runtime itself (cudaGetLastError), which the CUDA
            // wheel keeps in nvidia/cu13/lib beside torch/.
            println!("cargo:rustc-link-search=native={}", cudart.display());
            println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
            build
                .define("AXIAL_WITH_CUDA", "1")
                .include(&cuda_include)
                .include(cuda_include.join("cccl"));
        }
        if with_nccl {
            build
                .define("AXIAL_WITH_NCCL", "1")
                .define("USE_C10D_NCCL", "1")
                .include(&nccl_include);
        } else if has_cuda {
            println!(
                "cargo:warning=building without NCCL: CUDA or NCCL headers missing under {} (run scripts/setup-libtorch.sh)",
                nvidia.display()
            );
        }
        build
            .cpp(true)
            .std("c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag_if_supported("-Wno-unused-parameter")
            .flag_if_supported("-Wno-interference-size")
            .include("csrc") // the gloo header stand-ins
            .file("csrc/precision.cpp")
            .file("csrc/device_memory.cpp")
            .file("csrc/c10d_shim.cpp")
            .file("csrc/kv_store.cpp")
            .file("csrc/nccl_shim.cpp")
            .file("csrc/reducer.cpp")
            .file("csrc/cuda_graph.cpp")
            .file("csrc/profiler.cpp")
            .file("csrc/sgd.cpp")
            .file("csrc/shm.cpp")
            .compile("axial_shim");
        // The fused attention core's loops (csrc/attention.cpp) and the synchronized batch
        // norm's (csrc/sync_norm.cpp) are the hot path of every
        // CPU step: optimized in test builds too, multiply-adds fused where the CPU has FMA, and no FP
        // traps (so that selects on floats vectorize).
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .opt_level(3)
            .flag_if_supported("-ffp-contract=fast")
            .flag_if_supported("-fno-trapping-math")
            .flag_if_supported("-Wno-unused-parameter")
            .flag_if_supported("-Wno-psabi")
            .file("csrc/attention.cpp")
            .file("csrc/sync_norm.cpp")
            .compile("axial_attention");
    }
}
