// A grpc-js client of the shopping cart behind the proxy:
// `node cart.js <port> <user> <proto include dir>...`. Adds two items, reads
// the cart, then reads the cart of an empty user id; prints one JSON line.
'use strict';

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [port, user, ...includeDirs] = process.argv.slice(2);
const definition = protoLoader.loadSync('examples/shoppingcart/shoppingcart.proto', {
  keepCase: true,
  defaults: true,
  includeDirs,
});
const { ShoppingCart } = grpc.loadPackageDefinition(definition).com.example.shoppingcart;
const cart = new ShoppingCart(`127.0.0.1:${port}`, grpc.credentials.createInsecure());

function call(method, request) {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + 10000;
    cart[method](request, new grpc.Metadata(), { deadline }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

async function main() {
  const added = [
    await call('AddItem', { user_id: user, product_id: 'apple', name: 'Apple', quantity: 2 }),
    await call('AddItem', { user_id: user, product_id: 'pear', name: 'Pear', quantity: 3 }),
  ];
  const got = await call('GetCart', { user_id: user });
  let emptyUser;
  try {
    await call('GetCart', { user_id: '' });
    emptyUser = { code: grpc.status.OK };
  } catch (err) {
    emptyUser = { code: err.code };
  }
  return { added, cart: got, empty_user: emptyUser };
}

main()
  .then((result) => {
    process.stdout.write(JSON.stringify(result) + '\n');
    cart.close();
  })
  .catch((err) => {
    const failure = { error: String(err.stack || err), code: err.code };
    process.stdout.write(JSON.stringify(failure) + '\n');
    cart.close();
    process.exitCode = 1;
  });
