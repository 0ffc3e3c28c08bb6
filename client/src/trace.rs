//! W3C trace context (<https://www.w3.org/TR/trace-context/>) as it travels with a call:
//! the request header carries the 16-byte trace id, the span id of the call and the trace
//! flags; a handler reads them ([`crate::Request::trace_context`]) and a call it makes
//! while handling the request continues the same trace ([`crate::CallOptions::nested`]).
//!
//! The low 64 bits of the trace id are the `trace_id` that errors and logs have always
//! shown (`trace 0x…`), so a `traceparent` and an error message name the same trace.

/// One call's place in a trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// 16 bytes, big-endian as written in a `traceparent`; never 0 for a valid context.
    pub trace_id: u128,
    /// The span of the call that carries this context (the handler's parent span).
    pub span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// The `trace_id` of errors and logs: the low 64 bits of the trace id.
    pub fn id64(&self) -> u64 {
        self.trace_id as u64
    }

    /// The `traceparent` header value: `00-<32 hex>-<16 hex>-<2 hex>`.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }

    /// Parses a `traceparent` value (version 00; other versions are read by the same
    /// rules, as the specification asks). `None` for anything malformed, or all-zero ids.
    pub fn parse(s: &str) -> Option<TraceContext> {
        let mut parts = s.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let lower_hex = |p: &str, n: usize| {
            p.len() == n
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version, 2)
            || version == "ff"
            || !lower_hex(trace, 32)
            || !lower_hex(span, 16)
            || !lower_hex(flags, 2)
            || (version == "00" && parts.next().is_some())
        {
            return None;
        }
        let ctx = TraceContext {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (ctx.trace_id != 0 && ctx.span_id != 0).then_some(ctx)
    }

    /// The same trace with another span (a call made within this one).
    pub fn child(&self, span_id: u64) -> TraceContext {
        TraceContext { span_id, ..*self }
    }
}

impl std::fmt::Display for TraceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_malformed_ones_are_refused() {
        let t = TraceContext {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            flags: 1,
        };
        let s = t.traceparent();
        assert_eq!(s, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(TraceContext::parse(&s), Some(t));
        assert_eq!(t.to_string(), s);
        assert_eq!(t.id64(), 0xa3ce929d0e0e4736);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
    }
}
