//! vhost-user block and net backends that record every request
