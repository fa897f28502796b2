//! What is tunneled: the table of pending dials and established connections ([`table`], its only writer), each
//! connection's own counters and credit ([`link`]), and the queue towards each frontend ([`queue`]).

pub(crate) mod link;
pub(crate) mod queue;
pub(crate) mod table;
