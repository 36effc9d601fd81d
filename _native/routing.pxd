# Routing tables of one node: which local connections belong to a user, which are subscribed
# to a room. The messaging core resolves recipients (user ids) and calls fanout_users /
# fanout_room with bytes encoded once; the loops run in C over Python containers.

from gochat._native.connection cimport Connection

cdef class RoutingTable:
    cdef:
        dict users      # user_id -> Connection, or list[Connection] for a user with 2+ devices
                        # on this node (no list per single-device user: ~64 B per connection)
        dict rooms      # room_id -> dict[Connection, None] (insertion-ordered set; keyed by the
                        # object, not by an int conn_id made for each entry)
        readonly Py_ssize_t connections

    cpdef add_user_connection(self, Connection conn)
    cpdef remove_connection(self, Connection conn)
    cpdef list user_connections(self, object user_id)
    cpdef bint is_online(self, object user_id)
    cpdef bint has_other_connection(self, object user_id, Connection conn)
    cpdef bint subscribe(self, object room_id, Connection conn)
    cpdef bint unsubscribe(self, object room_id, Connection conn)
    cpdef Py_ssize_t room_size(self, object room_id)
    cpdef int fanout_users(self, object user_ids, bytes data, Connection skip=*, bint droppable=*) except -1
    cpdef int fanout_room(self, object room_id, bytes data, Connection skip=*, bint droppable=*) except -1
