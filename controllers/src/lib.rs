//! Ferro controllers: the runtime (reflector, queue, leader election) and one module per controller.
