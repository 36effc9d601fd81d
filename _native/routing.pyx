# cython: freethreading_compatible=False
"""Node-local routing tables; see routing.pxd."""

from gochat._native.connection cimport Connection, with_headroom


cdef class RoutingTable:
    def __init__(self):
        self.users = {}
        self.rooms = {}
        self.connections = 0

    cpdef add_user_connection(self, Connection conn):
        """Register an authenticated connection under its user id."""
        uid = conn.uid
        cur = self.users.get(uid)
        if cur is None:
            self.users[uid] = conn
        elif type(cur) is list:
            (<list>cur).append(conn)
        else:
            self.users[uid] = [cur, conn]
        self.connections += 1

    cpdef remove_connection(self, Connection conn):
        """Forget a connection: its user entry and every room subscription it holds."""
        uid = conn.uid
        cur = self.users.get(uid)
        if cur is None:
            return
        if type(cur) is list:
            if conn not in <list>cur:
                return
            (<list>cur).remove(conn)
            if len(<list>cur) == 1:
                self.users[uid] = (<list>cur)[0]
        elif cur is conn:
            del self.users[uid]
        else:
            return
        self.connections -= 1

    cpdef list user_connections(self, object user_id):
        cur = self.users.get(user_id)
        if cur is None:
            return []
        if type(cur) is list:
            return list(<list>cur)
        return [cur]

    cpdef bint is_online(self, object user_id):
        return user_id in self.users

    cpdef bint has_other_connection(self, object user_id, Connection conn):
        """True when ``user_id`` has a local connection besides ``conn``."""
        cur = self.users.get(user_id)
        if cur is None:
            return False
        if type(cur) is list:
            return len(<list>cur) > 1 or (<list>cur)[0] is not conn
        return cur is not conn

    cpdef bint subscribe(self, object room_id, Connection conn):
        subs = self.rooms.get(room_id)
        if subs is None:
            subs = self.rooms[room_id] = {}
        if conn in <dict>subs:
            return False
        (<dict>subs)[conn] = None
        return True

    cpdef bint unsubscribe(self, object room_id, Connection conn):
        subs = self.rooms.get(room_id)
        if subs is None or conn not in <dict>subs:
            return False
        del (<dict>subs)[conn]
        if not subs:
            del self.rooms[room_id]
        return True

    cpdef Py_ssize_t room_size(self, object room_id):
        subs = self.rooms.get(room_id)
        return 0 if subs is None else len(<dict>subs)

    cpdef int fanout_users(self, object user_ids, bytes data, Connection skip=None,
                           bint droppable=False) except -1:
        """Queue ``data`` to every local connection of every user in ``user_ids``."""
        cdef dict users = self.users
        cdef Connection c
        cdef int n = 0
        cdef bytes framed = None  # made on the first recipient: one copy for all of them
        for uid in user_ids:
            cur = users.get(uid)
            if cur is None:
                continue
            if type(cur) is list:
                for c in <list>cur:
                    if c is not skip:
                        if framed is None:
                            framed = with_headroom(data)
                        n += c.queue_shared(framed, droppable)
            elif cur is not skip:
                if framed is None:
                    framed = with_headroom(data)
                n += (<Connection>cur).queue_shared(framed, droppable)
        return n

    cpdef int fanout_room(self, object room_id, bytes data, Connection skip=None,
                          bint droppable=False) except -1:
        """Queue ``data`` to every subscriber of ``room_id`` on this node."""
        subs = self.rooms.get(room_id)
        if subs is None:
            return 0
        cdef Connection c
        cdef int n = 0
        cdef bytes framed = with_headroom(data)
        for c in <dict>subs:
            if c is not skip:
                n += c.queue_shared(framed, droppable)
        return n
