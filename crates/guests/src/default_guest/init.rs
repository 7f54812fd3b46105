//! The guest's `/init` script and the `vireo.cmd=` kernel parameter it understands.

/// Name of the kernel command-line parameter carrying the command to run. It contains a dot,
/// so the kernel treats it as a (unknown) module parameter and neither complains nor passes
/// it to init's argv/environment; init reads it from `/proc/cmdline`.
pub const CMD_PARAM: &str = "vireo.cmd";

/// Name of the kernel command-line parameter that configures a network interface:
/// `vireo.ip=[IFACE:]ADDR/PREFIX[,gw=GW]`, e.g. `vireo.ip=eth0:10.0.2.15/24,gw=10.0.2.2`.
/// IFACE defaults to `eth0`; give the parameter once per interface. Init brings the
/// interface up, adds the address and, with `gw=`, a default route through GW.
pub const IP_PARAM: &str = "vireo.ip";

/// The line init prints right before it starts the command or shell.
pub const READY_LINE: &str = "vireo-guest: init ready";

/// Prefix of the line init prints after the command exits, followed by its exit status.
pub const EXIT_STATUS_PREFIX: &str = "vireo-guest: exit status ";

/// Longest `vireo.cmd=` parameter accepted. x86's `COMMAND_LINE_SIZE` is 2048 bytes including
/// the base command line; this leaves room for it.
pub const MAX_CMD_PARAM_LEN: usize = 1536;

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with `=` padding (RFC 4648 §4), the alphabet busybox `base64 -d` reads.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Quotes `arg` for a POSIX shell: wrapped in single quotes, each `'` written as `'\''`
/// (POSIX.1-2017 XCU 2.2.2 "Single-Quotes"). Plain words are left bare for readability.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Why a command cannot be passed to the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("no command given to run in the guest")]
    Empty,
    #[error("the guest command contains a NUL byte, which a shell command cannot carry")]
    Nul,
    #[error(
        "the guest command is too long for the kernel command line ({len} bytes encoded, at \
         most {max}); put it in a script on a disk instead"
    )]
    TooLong { len: usize, max: usize },
}

/// `vireo.cmd=<base64 of the shell-quoted command>`; see [`super::command_param`].
pub fn command_param(args: &[String]) -> Result<String, CommandError> {
    if args.is_empty() {
        return Err(CommandError::Empty);
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(CommandError::Nul);
    }
    let script = args
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let param = format!("{CMD_PARAM}={}", base64_encode(script.as_bytes()));
    if param.len() > MAX_CMD_PARAM_LEN {
        return Err(CommandError::TooLong {
            len: param.len(),
            max: MAX_CMD_PARAM_LEN,
        });
    }
    Ok(param)
}

/// Text of `/init` for a kernel `version` loading `modules` (paths relative to
/// `/lib/modules/<version>/`, already in dependency order and free of shell metacharacters).
/// `install_applets` adds a `busybox --install -s` step, for when the applet links could not
/// be created at build time.
pub fn script(version: &str, modules: &[String], install_applets: bool) -> String {
    let install = if install_applets {
        "/bin/busybox --install -s\n"
    } else {
        ""
    };
    let module_list = modules.join(" \\\n        ");
    format!(
        r#"#!/bin/sh
# /init of the vireo default guest (written by vireo-guests; do not edit: it is rebuilt).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
{install}# After a switch from the initramfs these are already mounted (moved over).
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
grep -q ' /dev/pts ' /proc/mounts || mount -t devpts devpts /dev/pts
hostname -F /etc/hostname
ip link set lo up 2>/dev/null

cmd=
nets=
root=
read -r line </proc/cmdline
set -f
for p in $line; do
    case "$p" in
    {CMD_PARAM}=*) cmd="${{p#{CMD_PARAM}=}}" ;;
    {IP_PARAM}=*) nets="$nets ${{p#{IP_PARAM}=}}" ;;
    root=/dev/*) root="${{p#root=}}" ;;
    esac
done
set +f

if [ -e /{MARKER} ]; then
    # Virtio drivers, each after the modules it depends on.
    d=/lib/modules/{version}
    for m in \
        {module_list}
    do
        insmod "$d/$m" 2>/tmp/insmod.err ||
            echo "vireo-guest: insmod ${{m##*/}} failed: $(cat /tmp/insmod.err)"
    done
    rm -f /tmp/insmod.err

    # root=/dev/vdX: mount the root disk and continue with its /init.
    if [ -n "$root" ]; then
        mkdir -p /newroot
        if mount -t ext4 "$root" /newroot; then
            for m in /dev /proc /sys; do
                mount --move "$m" "/newroot$m"
            done
            exec switch_root /newroot /init
        fi
        echo "vireo-guest: cannot mount the root disk $root; staying in the initramfs"
    fi
fi

# Network interfaces (after the virtio_net module): {IP_PARAM}=[IFACE:]ADDR/PREFIX[,gw=GW],
# one per interface.
set -f
for spec in $nets; do
    dev=eth0
    case "$spec" in *:*) dev="${{spec%%:*}}"; spec="${{spec#*:}}" ;; esac
    gw=
    case "$spec" in *,gw=*) gw="${{spec#*,gw=}}"; spec="${{spec%%,gw=*}}" ;; esac
    if ip link set "$dev" up && ip addr add "$spec" dev "$dev"; then
        if [ -n "$gw" ] && ! ip route add default via "$gw" dev "$dev"; then
            echo "vireo-guest: cannot add a default route via $gw"
        fi
    else
        echo "vireo-guest: cannot configure $dev with $spec"
    fi
done
set +f

# The ACPI power button shuts the guest down cleanly (/etc/acpi/PWRF/00000080).
[ -d /sys/module/button ] && acpid -c /etc/acpi -l /tmp/acpid.log 2>/dev/null

export PS1='\h:\w\$ '
if [ -n "$cmd" ]; then
    if script=$(echo "$cmd" | base64 -d) && [ -n "$script" ]; then
        echo "{READY_LINE}"
        # The command runs under a session leader that waits for the console to drain its
        # output (busybox stty sets with TCSETSW) before it exits: a session leader's exit
        # hangs up the console, which discards output not yet sent.
        setsid cttyhack sh -c 'sh -c "$1"; rc=$?; stty "$(stty -g)" 2>/dev/null; exit $rc' sh "$script"
        echo "{EXIT_STATUS_PREFIX}$?"
    else
        echo "vireo-guest: cannot decode {CMD_PARAM}= from the kernel command line"
    fi
else
    echo "{READY_LINE}"
    setsid cttyhack sh
fi
sync
poweroff -f
"#,
        MARKER = super::ROOTFS_MARKER_INITRAMFS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decoder for the tests (RFC 4648 §4), independent of the encoder's table walk.
    fn base64_decode(s: &str) -> Vec<u8> {
        let val = |c: u8| BASE64.iter().position(|&x| x == c).unwrap() as u32;
        let mut out = Vec::new();
        for chunk in s.as_bytes().chunks(4) {
            assert_eq!(chunk.len(), 4);
            let pad = chunk.iter().filter(|&&c| c == b'=').count();
            let n = chunk
                .iter()
                .map(|&c| if c == b'=' { 0 } else { val(c) })
                .fold(0u32, |acc, v| (acc << 6) | v);
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        out
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        // RFC 4648 §10.
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, enc) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
            assert_eq!(base64_decode(enc), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)), all);
        assert!(
            base64_encode(&all).ends_with("+/w=="),
            "uses the standard alphabet"
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("/dev/vda"), "/dev/vda");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(shell_quote("*"), "'*'");
    }

    fn param_payload(p: &str) -> String {
        let b64 = p.strip_prefix("vireo.cmd=").unwrap();
        assert!(
            b64.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
            "kernel command line needs no quoting: {b64}"
        );
        String::from_utf8(base64_decode(b64)).unwrap()
    }

    #[test]
    fn command_param_round_trips() {
        let args: Vec<String> = ["sh", "-c", "dmesg | grep -i virtio; echo \"it's $HOME\""]
            .map(String::from)
            .to_vec();
        let p = command_param(&args).unwrap();
        assert_eq!(
            param_payload(&p),
            r#"sh -c 'dmesg | grep -i virtio; echo "it'\''s $HOME"'"#
        );
    }

    #[test]
    fn command_param_errors() {
        assert_eq!(command_param(&[]), Err(CommandError::Empty));
        assert_eq!(command_param(&["a\0b".to_string()]), Err(CommandError::Nul));
        let long = vec!["x".repeat(2000)];
        assert!(matches!(
            command_param(&long),
            Err(CommandError::TooLong {
                max: MAX_CMD_PARAM_LEN,
                ..
            })
        ));
        // The longest accepted payload is right at the limit.
        let n = (MAX_CMD_PARAM_LEN - CMD_PARAM.len() - 1) / 4 * 3;
        assert!(command_param(&["y".repeat(n)]).is_ok());
        assert!(command_param(&["y".repeat(n + 1)]).is_err());
    }

    /// Runs the command through a real shell the way `/init` does (decode, then `sh -c`) and
    /// checks that the arguments arrive unchanged. Uses the host's `sh` and `base64`.
    #[test]
    fn command_param_survives_the_init_decoding() {
        let args: Vec<String> = ["printf", "[%s]", "a b", "it's", "$(echo x)", "", "*"]
            .map(String::from)
            .to_vec();
        let p = command_param(&args).unwrap();
        let b64 = p.strip_prefix("vireo.cmd=").unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"script=$(echo "$1" | base64 -d) && sh -c "$script""#)
            .arg("sh")
            .arg(b64)
            .output();
        let Ok(out) = out else {
            eprintln!("skipping: no host sh");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "[a b][it's][$(echo x)][][*]"
        );
    }

    #[test]
    fn script_lists_modules_in_order_and_parses() {
        let mods = vec![
            "kernel/drivers/virtio/virtio.ko".to_string(),
            "kernel/drivers/virtio/virtio_ring.ko".to_string(),
        ];
        let s = script("6.1.0-48-cloud-amd64", &mods, false);
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("d=/lib/modules/6.1.0-48-cloud-amd64\n"));
        let a = s.find("virtio/virtio.ko").unwrap();
        let b = s.find("virtio/virtio_ring.ko").unwrap();
        assert!(a < b);
        assert!(s.contains("vireo.cmd=*)"));
        assert!(s.contains("vireo.ip=*)"));
        assert!(s.contains(READY_LINE));
        assert!(s.trim_end().ends_with("poweroff -f"));
        assert!(!s.contains("--install"));
        assert!(script("v", &mods, true).contains("/bin/busybox --install -s\n"));
        // The host shell accepts the syntax (-n: parse only).
        if let Ok(out) = std::process::Command::new("sh")
            .args(["-n", "-c", &s])
            .output()
        {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// The network part of `/init`, run by the host's shell with `ip` replaced by a function
    /// that prints its arguments: each `vireo.ip=` becomes the right `ip` commands.
    #[test]
    fn ip_parameters_configure_interfaces() {
        let s = script("v", &[], false);
        // The command line's parsing, then the network set-up (after the modules load).
        let start = s.find("cmd=\nnets=").unwrap();
        let end = s.find("set +f\n").unwrap() + "set +f\n".len();
        let net = s.find("# Network interfaces").unwrap();
        let net_end = net + s[net..].find("set +f\n").unwrap() + "set +f\n".len();
        let part = format!("{}{}", &s[start..end], &s[net..net_end]);
        let cmdline = "console=ttyS0 vireo.ip=10.0.2.15/24,gw=10.0.2.2 quiet \
                       vireo.ip=eth1:192.168.7.2/16 vireo.cmd=eA==";
        let prog = format!(
            "ip() {{ echo \"ip $*\"; }}\n{}\necho \"cmd=$cmd\"",
            part.replace("</proc/cmdline", &format!("<<'EOF'\n{cmdline}\nEOF"))
        );
        let Ok(out) = std::process::Command::new("sh")
            .arg("-c")
            .arg(&prog)
            .output()
        else {
            eprintln!("skipping: no host sh");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text,
            "ip link set eth0 up\nip addr add 10.0.2.15/24 dev eth0\n\
             ip route add default via 10.0.2.2 dev eth0\n\
             ip link set eth1 up\nip addr add 192.168.7.2/16 dev eth1\ncmd=eA==\n",
            "{prog}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
