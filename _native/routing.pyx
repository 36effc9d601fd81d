# cython: freethreading_compatible=False
"""Node-local routing tables; see routing.pxd."""

from gochat._native.fanout cimport Connection, FanoutWriter


cdef class RoutingTable:
    def __init__(self):
        self.users = {}
        self.rooms = {}
        self.connections = 0

    cpdef add_user_connection(self, Connection conn):
        """Register an authenticated connection under its user id."""
        lst = self.users.get(conn.user_id)
        if lst is None:
            self.users[conn.user_id] = [conn]
        else:
            (<list>lst).append(conn)
        self.connections += 1

    cpdef remove_connection(self, Connection conn):
        """Forget a connection: its user entry and every room subscription it holds."""
        lst = self.users.get(conn.user_id)
        if lst is not None and conn in <list>lst:
            (<list>lst).remove(conn)
            self.connections -= 1
            if not lst:
                del self.users[conn.user_id]

    cpdef list user_connections(self, object user_id):
        lst = self.users.get(user_id)
        return [] if lst is None else list(<list>lst)

    cpdef bint is_online(self, object user_id):
        return user_id in self.users

    cpdef bint subscribe(self, object room_id, Connection conn):
        subs = self.rooms.get(room_id)
        if subs is None:
            subs = self.rooms[room_id] = {}
        if conn.conn_id in <dict>subs:
            return False
        (<dict>subs)[conn.conn_id] = conn
        return True

    cpdef bint unsubscribe(self, object room_id, Connection conn):
        subs = self.rooms.get(room_id)
        if subs is None or conn.conn_id not in <dict>subs:
            return False
        del (<dict>subs)[conn.conn_id]
        if not subs:
            del self.rooms[room_id]
        return True

    cpdef Py_ssize_t room_size(self, object room_id):
        subs = self.rooms.get(room_id)
        return 0 if subs is None else len(<dict>subs)

    cpdef int fanout_users(self, FanoutWriter writer, object user_ids, bytes data,
                           Connection skip=None, bint droppable=False) except -1:
        """Queue ``data`` to every local connection of every user in ``user_ids``."""
        cdef dict users = self.users
        cdef Connection c
        cdef int n = 0
        for uid in user_ids:
            lst = users.get(uid)
            if lst is None:
                continue
            for c in <list>lst:
                if c is not skip:
                    n += c.queue_frame(data, droppable)
        return n

    cpdef int fanout_room(self, FanoutWriter writer, object room_id, bytes data,
                          Connection skip=None, bint droppable=False) except -1:
        """Queue ``data`` to every subscriber of ``room_id`` on this node."""
        subs = self.rooms.get(room_id)
        if subs is None:
            return 0
        cdef Connection c
        cdef int n = 0
        for c in (<dict>subs).values():
            if c is not skip:
                n += c.queue_frame(data, droppable)
        return n
