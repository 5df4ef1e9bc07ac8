// An HTTP server for unik's language tests: /ping_test, /env_test (env KEY), /mount_test (/data/data.txt).
'use strict';
const fs = require('fs');
const http = require('http');

const port = Number(process.env.PORT || 8080);

const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  const reply = (status, type, body) => {
    res.writeHead(status, { 'Content-Type': type });
    res.end(body);
  };
  if (path === '/ping_test') {
    reply(200, 'application/json', JSON.stringify({ message: 'pong' }));
  } else if (path === '/env_test') {
    reply(200, 'text/plain', process.env.KEY || '');
  } else if (path === '/mount_test') {
    fs.readFile('/data/data.txt', (err, data) => {
      if (err) reply(404, 'application/json', '{"message":"/data/data.txt not found"}');
      else reply(200, 'text/plain', data);
    });
  } else {
    reply(404, 'application/json', '{"message":"no such path"}');
  }
});

process.on('SIGTERM', () => server.close(() => process.exit(0)));
server.listen(port, '0.0.0.0', () => console.log(`nodejs-http: listening on :${port}`));
