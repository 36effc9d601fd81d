# The native session state machine (see session.pyx): a Connection whose binary messages are
# walked frame by frame in C, through the codec's header parser and body checks.

from libc.stdint cimport uint32_t

from gochat._native.connection cimport Connection


cdef class Session(Connection):
    cdef int _frame(self, const unsigned char* p, double now) except -1
    cdef int _pong(self, uint32_t rid, const unsigned char* payload, Py_ssize_t n) except -1
