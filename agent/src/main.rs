//! sms-agent: placeholder
fn main() {}
