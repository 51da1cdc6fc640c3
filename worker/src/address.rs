//! The address a worker advertises for the collective's traffic: where the other ranks reach
//! it. Gloo binds its device to it (never to the coordinator's or another rank's address).
//!
//! By default it is the local address of the route to the coordinator: on a cluster that is
//! the interface the job's traffic takes, with no configuration. `--host` overrides it, and
//! `--iface` names a network interface instead. A loopback address is only good when the
//! coordinator is on this machine too.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

use crate::collective::Local;

/// What this worker advertises, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    /// Sent to the coordinator (shown on its status page, checked against loopback).
    pub host: String,
    /// Where Gloo's device is bound.
    pub local: Local,
    /// How the address was found, for the start-up line.
    pub how: String,
}

/// The coordinator's socket address from its URL (`http://host:port`; port 80/443 if absent).
pub fn coordinator_addr(uri: &tonic::transport::Uri) -> Result<SocketAddr, String> {
    let host = uri
        .host()
        .ok_or_else(|| format!("--coordinator {uri}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("--coordinator {uri}: cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("--coordinator {uri}: {host} resolves to no address"))
}

/// The local address this machine would send from to reach `to` (no packet is sent: a UDP
/// socket is only connected, which picks the route).
pub fn route_to(to: SocketAddr) -> Result<IpAddr, String> {
    let any: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(any).map_err(|e| format!("a socket to find the route: {e}"))?;
    socket
        .connect(to)
        .map_err(|e| format!("no route to the coordinator at {to}: {e}"))?;
    socket
        .local_addr()
        .map(|a| a.ip())
        .map_err(|e| format!("the route to {to}: {e}"))
}

/// The first IPv4 address (else IPv6) of network interface `name`.
#[allow(unsafe_code)]
pub fn interface_address(name: &str) -> Result<IpAddr, String> {
    let mut found: Option<IpAddr> = None;
    let mut names = Vec::new();
    // SAFETY: getifaddrs fills a linked list that freeifaddrs releases; we only read entries
    // whose ifa_addr is non-null and whose family tells the sockaddr's type.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return Err(format!(
                "cannot list network interfaces: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut cursor = list;
        while !cursor.is_null() {
            let entry = &*cursor;
            cursor = entry.ifa_next;
            let ifname = std::ffi::CStr::from_ptr(entry.ifa_name)
                .to_string_lossy()
                .into_owned();
            if !names.contains(&ifname) {
                names.push(ifname.clone());
            }
            if ifname != name || entry.ifa_addr.is_null() {
                continue;
            }
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(entry.ifa_addr as *const libc::sockaddr_in);
                    found = Some(IpAddr::from(a.sin_addr.s_addr.to_ne_bytes()));
                    break;
                }
                libc::AF_INET6 if found.is_none() => {
                    let a = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                    found = Some(IpAddr::from(a.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        libc::freeifaddrs(list);
    }
    found.ok_or_else(|| {
        format!(
            "--iface {name}: no such interface with an address (interfaces: {})",
            names.join(", ")
        )
    })
}

/// Whether `host` names this machine's loopback interface.
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The advertised address from `--host`, `--iface`, or the route to the coordinator at
/// `coordinator`; refused when it is a loopback address and the coordinator is not.
pub fn advertised(
    host: Option<&str>,
    iface: Option<&str>,
    coordinator: SocketAddr,
) -> Result<Advertised, String> {
    let local_of = |host: &str| match iface {
        Some(i) => Local::Interface(i.to_owned()),
        None => Local::Host(host.to_owned()),
    };
    let chosen = match (host, iface) {
        (Some(h), _) => Advertised {
            host: h.to_owned(),
            local: local_of(h),
            how: "--host".into(),
        },
        (None, Some(i)) => {
            let ip = interface_address(i)?.to_string();
            Advertised {
                local: local_of(&ip),
                host: ip,
                how: format!("the address of --iface {i}"),
            }
        }
        (None, None) => {
            let ip = route_to(coordinator)?.to_string();
            Advertised {
                local: local_of(&ip),
                host: ip,
                how: format!("the local address of the route to the coordinator at {coordinator}"),
            }
        }
    };
    if is_loopback(&chosen.host) && !coordinator.ip().to_canonical().is_loopback() {
        return Err(format!(
            "{} gives {}, a loopback address, but the coordinator at {coordinator} is on another \
             host: ranks elsewhere could not reach this worker. Give --host this machine's \
             address on the cluster network (or leave --host out to use the route to the \
             coordinator)",
            chosen.how, chosen.host
        ));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_to_a_loopback_coordinator_is_loopback() {
        let coordinator: SocketAddr = "127.0.0.1:50051".parse().expect("addr");
        let a = advertised(None, None, coordinator).expect("route");
        assert!(is_loopback(&a.host), "{a:?}");
        assert_eq!(a.local, Local::Host(a.host.clone()));
    }

    #[test]
    fn a_loopback_address_is_refused_for_a_remote_coordinator() {
        let remote: SocketAddr = "10.77.0.1:50051".parse().expect("addr");
        let err = advertised(Some("127.0.0.1"), None, remote).expect_err("refused");
        assert!(
            err.contains("loopback") && err.contains("10.77.0.1"),
            "{err}"
        );
        assert!(advertised(Some("10.77.0.2"), None, remote).is_ok());
        assert!(is_loopback("localhost") && is_loopback("::1") && !is_loopback("10.0.0.1"));
    }

    #[test]
    fn interfaces_are_found_by_name() {
        let lo = interface_address("lo").expect("lo");
        assert!(lo.is_loopback());
        let err = interface_address("no-such-if0").expect_err("missing");
        assert!(err.contains("no-such-if0") && err.contains("lo"), "{err}");
    }
}
