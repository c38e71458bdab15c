//! `link-relay LISTEN UPSTREAM RTT_MS MBIT`: a long link on one machine (`sms_tests::relay`):
//! relays every connection to UPSTREAM with RTT_MS of round trip and MBIT Mbit/s each way
//! (0: no cap). Prints `listening on ADDR`, then runs until killed. Used by bench/longlink.sh.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let a: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(up), Some(rtt), Some(mbit)) = (
        a.get(1),
        a.get(2),
        a.get(3).and_then(|x| x.parse::<u64>().ok()),
        a.get(4).and_then(|x| x.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: link-relay LISTEN UPSTREAM RTT_MS MBIT");
        return ExitCode::from(2);
    };
    match sms_tests::relay::Relay::start(listen, up, sms_tests::relay::LinkSpec::new(rtt, mbit)) {
        Ok(r) => {
            println!("listening on {}", r.addr);
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("link-relay: {e}");
            ExitCode::FAILURE
        }
    }
}
