//! The bridge between the datapath's synchronous calls and rtnetlink's
//! async API: a single-threaded runtime of the datapath's own, and the
//! subscription to the kernel's notifications that tells whether a kept
//! observation can still be trusted.

use std::future::Future;

use rtnetlink::Handle;

use super::Linux;
use crate::datapath::DatapathError;

/// The datapath's own single-threaded runtime for netlink. It may be
/// dropped inside the agent's runtime, so it shuts down in the background.
pub(super) struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs a future to completion on the datapath's runtime, from any thread
/// (the agent calls the datapath from inside its own runtime).
pub(super) fn block_on<T: Send>(rt: &Runtime, f: impl Future<Output = T> + Send) -> Result<T, DatapathError> {
    let rt = rt.0.as_ref().ok_or_else(|| DatapathError::Internal("the netlink runtime is gone".into()))?;
    std::thread::scope(|s| s.spawn(|| rt.block_on(f)).join())
        .map_err(|_| DatapathError::Internal("the netlink worker panicked".into()))
}

pub(super) fn runtime() -> Result<(Runtime, Handle), DatapathError> {
    let rt = Runtime(Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DatapathError::io("starting the netlink runtime", e))?,
    ));
    let handle = block_on(&rt, async {
        rtnetlink::new_connection().map(|(conn, handle, _)| {
            tokio::spawn(conn);
            handle
        })
    })?
    .map_err(|e| DatapathError::io("opening a netlink socket", e))?;
    Ok((rt, handle))
}

type Notifications = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A subscription to the kernel's link, address, route and rule
/// notifications (`ip monitor`).
pub(super) struct Watch {
    messages: Notifications,
    task: tokio::task::JoinHandle<()>,
}

impl Linux {
    /// Starts a fresh subscription (ending the previous one): from now on any
    /// change to links, addresses, routes or rules is noticed.
    pub(super) fn subscribe(&mut self) -> Result<(), DatapathError> {
        use rtnetlink::MulticastGroup as G;
        if let Some(old) = self.watch.take() {
            old.task.abort();
        }
        let groups = [G::Link, G::Ipv4Ifaddr, G::Ipv6Ifaddr, G::Ipv4Route, G::Ipv6Route, G::Ipv4Rule, G::Ipv6Rule];
        let watch = block_on(&self.rt, async move {
            let (conn, _, messages) = rtnetlink::new_multicast_connection(&groups)?;
            Ok::<_, std::io::Error>(Watch { messages, task: tokio::spawn(conn) })
        })?
        .map_err(|e| DatapathError::io("subscribing to netlink notifications", e))?;
        self.watch = Some(watch);
        Ok(())
    }

    /// Whether nothing has changed since the subscription began.
    pub(super) fn quiet(&mut self) -> bool {
        let Some(watch) = self.watch.as_mut() else { return false };
        // Let the subscription's task read what the socket holds.
        if block_on(&self.rt, tokio::time::sleep(std::time::Duration::from_millis(1))).is_err() {
            return false;
        }
        // Empty and open: quiet. A message, an overrun or a closed channel: not.
        matches!(watch.messages.try_recv(), Err(e) if e.is_empty())
    }
}
