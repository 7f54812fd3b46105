# Shared by scripts/run and scripts/test.

# Host tools vireo and its tests use: apt-get/dpkg-deb (default guest), qemu (peer in tests
# and benchmarks), e2fsprogs (root disk images).
ensure_host_tools() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo is not installed: install Rust from https://rustup.rs (vireo needs Rust 1.89+)" >&2
        exit 1
    fi
    local missing=()
    command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
    command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
    command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ]; then
            echo "installing: ${missing[*]}" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
                echo "warning: could not install ${missing[*]}; tests that need them will skip" >&2
        else
            echo "note: ${missing[*]} not installed (sudo apt-get install ${missing[*]}); tests that need them will skip" >&2
        fi
    fi
}

# Print whether /dev/kvm works and whether it is KVM-PVM.
report_kvm() {
    python3 - <<'PY' || true
import fcntl, os
try:
    fd = os.open("/dev/kvm", os.O_RDWR)
    v = fcntl.ioctl(fd, 0xAE00)  # KVM_GET_API_VERSION
    os.close(fd)
    state = f"usable (API {v})"
except OSError as e:
    state = f"not usable ({e.strerror})"
pvm = os.path.exists("/sys/module/kvm_pvm")
print(f"/dev/kvm: {state}" + ("; KVM-PVM host: guest kernels are slow, Linux tests use --accel emu" if pvm else ""))
PY
}
