// Node `ws` room broadcast: every binary message is sent to every other client
// (wss.clients, insertion order), one ws.send per message per socket; no compression.
//   node bench/peers/node/server.js PORT
'use strict';
const { WebSocketServer } = require('ws');
const port = parseInt(process.argv[2] || '0', 10);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false, backlog: 4096, clientTracking: true });
wss.on('listening', () => { console.log(`listening ${wss.address().port}`); });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    for (const c of wss.clients) {
      if (c !== ws && c.readyState === 1) c.send(data, { binary: isBinary });
    }
  });
  ws.on('error', () => {});
});
